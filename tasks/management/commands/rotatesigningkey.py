from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks import audit
from tasks.applications import InvalidApplication, rotate_signing_key
from tasks.models import Application


class Command(BaseCommand):
    help = (
        "Issue a new Ed25519 signing key for an application that signs with ed25519 or both, and "
        "print its key id. During the grace period deliveries carry a v1a signature with each "
        "key, and the JWKS lists both."
    )

    def add_arguments(self, parser):
        parser.add_argument("app_id")
        parser.add_argument("--grace-hours", type=float, default=24.0)

    def handle(self, *args, **options):
        if options["grace_hours"] < 0:
            raise CommandError("--grace-hours must not be negative")
        try:
            with transaction.atomic():
                kid = rotate_signing_key(
                    application_id=options["app_id"], grace_hours=options["grace_hours"]
                )
                audit.record_command(command="rotatesigningkey",
                                     action="application.rotate_signing_key",
                                     target_type="application", target_id=options["app_id"],
                                     detail={"grace_hours": options["grace_hours"],
                                             "kid": kid})  # fmt: skip
        except InvalidApplication as exc:
            flag = "--grace-hours" if exc.field == "grace_hours" else "--signing"
            raise CommandError(f"{flag}: {exc.message}") from exc
        except (Application.DoesNotExist, ValueError, ValidationError) as exc:
            raise CommandError(f"no application {options['app_id']!r}") from exc
        self.stdout.write(kid)
        self.stderr.write(
            f"New signing key {kid} issued; the old one also signs and stays in the JWKS for "
            f"{options['grace_hours']:g} h."
        )
