import uuid

from django.core.management.base import BaseCommand, CommandError

from tasks import audit
from tasks.credentials import revoke_api_keys
from tasks.models import Application


class Command(BaseCommand):
    help = (
        "Revoke API keys at once: one by its prefix as displayed (thk_hgulP2A2), or every key "
        "of an application with --app. Web processes stop accepting them within "
        "AUTH_CACHE_SECONDS (their key lookup cache)."
    )

    def add_arguments(self, parser):
        parser.add_argument("prefix", nargs="?", help="the key's prefix, e.g. thk_hgulP2A2")
        parser.add_argument("--app", dest="app_id", help="every key of this application")

    def handle(self, *args, **options):
        prefix, app_id = options["prefix"], options["app_id"]
        if not prefix and not app_id:
            raise CommandError("give a KEY_PREFIX or --app APP_ID")
        if app_id:
            try:
                Application.objects.get(pk=uuid.UUID(app_id))
            except (ValueError, Application.DoesNotExist) as exc:
                raise CommandError(f"--app: no application {app_id!r}") from exc
        result = revoke_api_keys(application_id=app_id, prefix=prefix)
        if not result.revoked and not result.already:
            where = f" in application {app_id}" if app_id else ""
            raise CommandError(f"no API key with the prefix {prefix!r}{where}")
        for key in result.revoked:
            app = key.application
            audit.record_command(command="revokekey", action="application.revoke_key",
                                 target_type="application", target_id=app.pk,
                                 target_label=app.name,
                                 detail={"key": f"{key.prefix}…", "revoked": True})  # fmt: skip
            self.stdout.write(f"revoked {key.prefix}… of {app.name!r} ({app.pk})")
        for key in result.already:
            assert key.revoked_at is not None  # `already` holds the keys revoked before
            self.stdout.write(
                f"{key.prefix}… of {key.application.name!r} was already revoked at "
                f"{key.revoked_at.isoformat()}"
            )
        if result.revoked:
            self.stderr.write(
                f"{len(result.revoked)} key(s) revoked; every web process refuses them within "
                "AUTH_CACHE_SECONDS. `manage.py rotatekey APP_ID` issues a new one."
            )
