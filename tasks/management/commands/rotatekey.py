from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks import audit
from tasks.applications import InvalidApplication, rotate_api_key
from tasks.models import Application


class Command(BaseCommand):
    help = (
        "Issue a new API key for an application and print it (shown once). The current keys "
        "keep working for the grace period, then stop; 0 stops them at once."
    )

    def add_arguments(self, parser):
        parser.add_argument("app_id")
        parser.add_argument("--grace-hours", type=float, default=24.0, metavar="H")

    def handle(self, *args, **options):
        grace = options["grace_hours"]
        try:
            with transaction.atomic():
                key = rotate_api_key(application_id=options["app_id"], grace_hours=grace)
                audit.record_command(command="rotatekey", action="application.rotate_key",
                                     target_type="application", target_id=options["app_id"],
                                     detail={"grace_hours": grace})  # fmt: skip
        except InvalidApplication as exc:
            raise CommandError(f"--grace-hours: {exc.message}") from exc
        except (Application.DoesNotExist, ValueError, ValidationError) as exc:
            raise CommandError(f"no application {options['app_id']!r}") from exc
        self.stdout.write(key)
        if grace > 0:
            note = f"the old key(s) keep working for {grace:g} h"
        else:
            note = "the old key(s) stopped (within AUTH_CACHE_SECONDS on every web process)"
        self.stderr.write(f"New API key issued, shown only this once; {note}.")
