import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from tasks import audit
from tasks.applications import InvalidApplication, update_application
from tasks.delivery.destinations import masked_urls
from tasks.models import Application

from ._application_settings import (
    FLAG_OF,
    add_setting_arguments,
    describe,
    destinations_from_options,
    invalid,
    settings_from_options,
    settings_lines,
)


class Command(BaseCommand):
    help = (
        "Change an application's settings (any the dashboard's settings form can) and print "
        "them all; with no setting flag, only print them."
    )

    def add_arguments(self, parser):
        parser.add_argument("app_id")
        add_setting_arguments(parser, creating=False)
        parser.add_argument("--json", action="store_true", help="print the settings as JSON")

    def handle(self, *args, **options):
        changes = settings_from_options(options)
        destination_flags = destinations_from_options(options)
        try:
            with transaction.atomic():
                current = Application.objects.get(pk=options["app_id"])
                before = {name: getattr(current, name) for name in changes}
                if destination_flags:
                    before["destinations"] = masked_urls(current.pk)
                application = update_application(
                    application_id=current.pk, **destination_flags, **changes
                )
                after = {name: getattr(application, name) for name in changes}
                if destination_flags:
                    after["destinations"] = masked_urls(current.pk)
                if diff := audit.changes(before, after):
                    audit.record_command(command="setapplication", action="application.update",
                                         target_type="application", target_id=application.pk,
                                         target_label=application.name,
                                         detail={"changes": diff})  # fmt: skip
        except InvalidApplication as exc:
            raise invalid(exc) from exc
        except (Application.DoesNotExist, ValueError, ValidationError) as exc:  # or not a UUID
            raise CommandError(f"no application {options['app_id']!r}") from exc
        if options["json"]:
            self.stdout.write(json.dumps(describe(application)))
            return
        if changes or destination_flags:
            flags = sorted(
                {FLAG_OF[name] for name in changes}
                | {
                    "--clear-destinations" if name == "clear_destinations" else "--destination"
                    for name in destination_flags
                }
            )
            self.stdout.write(f"Updated {application.name!r} ({', '.join(flags)}):")
        else:
            self.stdout.write(f"{application.name!r} (nothing changed):")
        self.stdout.write("\n".join(settings_lines(application)))
