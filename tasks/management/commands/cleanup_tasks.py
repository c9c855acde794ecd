import uuid

from django.core.management.base import BaseCommand, CommandError

from tasks import audit
from tasks.models import Application, CleanupRun
from tasks.upkeep.retention import run_cleanup


class Command(BaseCommand):
    help = "Run retention once: remove finished tasks past their application's TTL."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="count, remove nothing")
        parser.add_argument("--app", dest="app_id", default=None, help="only this application")

    def handle(self, *args, **options):
        app_id = options["app_id"]
        if app_id and not Application.objects.filter(pk=_uuid_or_fail(app_id)).exists():
            raise CommandError(f"no application {app_id!r}")
        run = run_cleanup(
            trigger=CleanupRun.Trigger.COMMAND, application_id=app_id, dry_run=options["dry_run"]
        )
        if run is None:
            raise CommandError("another cleanup is running (lock held); nothing done")
        if not options["dry_run"]:
            audit.record_command(command="cleanup_tasks", action="retention.cleanup",
                                 target_type="application" if app_id else "retention",
                                 target_id=app_id or run.pk,
                                 target_label="" if app_id else f"cleanup run #{run.pk}",
                                 detail={"removed": run.total_removed})  # fmt: skip
        verb = "would remove" if options["dry_run"] else "removed"
        for app_pk, entry in run.removed.items():
            self.stdout.write(f"{entry['name']} ({app_pk}): {verb} {entry['tasks']} task(s)")
        self.stdout.write(f"total: {verb} {run.total_removed} task(s)")


def _uuid_or_fail(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise CommandError(f"no application {value!r}") from exc
