import json
import shlex

from django.core.management.base import BaseCommand
from django.db import transaction

from tasks import audit
from tasks.applications import InvalidApplication, create_application
from tasks.delivery.destinations import masked_urls

from ._application_settings import (
    add_setting_arguments,
    destinations_from_options,
    invalid,
    settings_from_options,
    settings_lines,
)


class Command(BaseCommand):
    help = "Create an application and print its app_id, api_key and webhook_secret (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        add_setting_arguments(parser, creating=True)
        output = parser.add_mutually_exclusive_group()
        output.add_argument("--json", action="store_true", help="print one JSON object only")
        output.add_argument(
            "--shell",
            action="store_true",
            help='print `export APP_ID=… API_KEY=… WEBHOOK_SECRET=…` only, for eval "$(…)"',
        )

    def handle(self, *args, **options):
        changes = settings_from_options(options)
        urls = destinations_from_options(options).get("destinations", [])
        try:
            with transaction.atomic():
                created = create_application(name=options["name"], destinations=urls, **changes)
                audit.record_command(command="createapplication", action="application.create",
                                     target_type="application", target_id=created.application.pk,
                                     target_label=created.application.name,
                                     detail={"name": created.application.name,
                                             "settings": changes,
                                             "destinations": masked_urls(
                                                 created.application.pk)})  # fmt: skip
        except InvalidApplication as exc:
            if exc.field == "name":
                raise invalid(InvalidApplication("NAME", exc.message)) from exc
            raise invalid(exc) from exc
        values = {
            "app_id": str(created.application.id),
            "api_key": created.api_key,
            "webhook_secret": created.webhook_secret,
        }
        if options["json"]:
            self.stdout.write(json.dumps(values))
            return
        if options["shell"]:
            exports = " ".join(f"{name.upper()}={shlex.quote(v)}" for name, v in values.items())
            self.stdout.write(f"export {exports}")
            self.stderr.write(
                f"Created application {created.application.name!r}: APP_ID, API_KEY and "
                "WEBHOOK_SECRET are set (the key and secret are shown only this once)."
            )
            return
        self.stdout.write(f"Created application {created.application.name!r}.")
        for name, value in values.items():
            self.stdout.write(f"  {name:17} {value}")
        self.stdout.write(
            "The API key and webhook secret are shown only this once: store them now."
        )
        self.stdout.write("Settings (change them with `manage.py setapplication APP_ID …`):")
        self.stdout.write("\n".join(settings_lines(created.application)[1:]))
