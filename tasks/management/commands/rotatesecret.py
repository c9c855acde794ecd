from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks import audit
from tasks.applications import InvalidApplication, rotate_webhook_secret
from tasks.models import Application


class Command(BaseCommand):
    help = (
        "Issue a new webhook secret for an application. During the grace period deliveries carry "
        "signatures with both the old and the new secret."
    )

    def add_arguments(self, parser):
        parser.add_argument("app_id")
        parser.add_argument("--grace-hours", type=float, default=24.0)

    def handle(self, *args, **options):
        if options["grace_hours"] < 0:
            raise CommandError("--grace-hours must not be negative")
        try:
            with transaction.atomic():
                secret = rotate_webhook_secret(
                    application_id=options["app_id"], grace_hours=options["grace_hours"]
                )
                audit.record_command(command="rotatesecret", action="application.rotate_secret",
                                     target_type="application", target_id=options["app_id"],
                                     detail={"grace_hours": options["grace_hours"]})  # fmt: skip
        except InvalidApplication as exc:
            raise CommandError(f"--grace-hours: {exc.message}") from exc
        except (Application.DoesNotExist, ValueError, ValidationError) as exc:
            raise CommandError(f"no application {options['app_id']!r}") from exc
        self.stdout.write(secret)
        self.stderr.write(
            f"New webhook secret issued; the old one also signs for {options['grace_hours']:g} h. "
            "It is shown only this once."
        )
