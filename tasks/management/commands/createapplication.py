import json

from django.core.management.base import BaseCommand, CommandError

from tasks.applications import InvalidApplication, create_application


class Command(BaseCommand):
    help = "Create an application and print its app_id, api_key and webhook_secret (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument(
            "--runner", required=True, help="echo, sleep, fail, http or a.dotted.path"
        )
        parser.add_argument(
            "--runner-config", default=None, help="JSON object, e.g. '{\"url\": …}'"
        )
        parser.add_argument("--retry-schedule", default=None, help="seconds, e.g. 10,60,300")
        parser.add_argument("--retention-hours", type=int, default=24)
        parser.add_argument("--json", action="store_true", help="print one JSON object only")

    def handle(self, *args, **options):
        runner_config = None
        if options["runner_config"]:
            try:
                runner_config = json.loads(options["runner_config"])
            except ValueError as exc:
                raise CommandError(f"--runner-config is not valid JSON: {exc}") from exc
        try:
            created = create_application(
                name=options["name"],
                runner=options["runner"],
                runner_config=runner_config,
                retry_schedule=options["retry_schedule"],
                retention_hours=options["retention_hours"],
            )
        except InvalidApplication as exc:
            raise CommandError(f"--{exc.field.replace('_', '-')}: {exc.message}") from exc
        values = {
            "app_id": str(created.application.id),
            "api_key": created.api_key,
            "webhook_secret": created.webhook_secret,
        }
        if options["json"]:
            self.stdout.write(json.dumps(values))
            return
        self.stdout.write(f"Created application {created.application.name!r}.")
        for name, value in values.items():
            self.stdout.write(f"  {name:15} {value}")
        self.stdout.write(
            "The API key and webhook secret are shown only this once: store them now."
        )
