"""Creating applications and rotating their credentials."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import credentials, retry_policy
from .models import ApiKey, Application
from .runners import resolve_runner


class InvalidApplication(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# application id -> (monotonic deadline, Application). Workers look the application up for every
# task; a changed runner or timeout takes effect within AUTH_CACHE_SECONDS.
_app_cache: dict[str, tuple[float, Application]] = {}


def cached_application(application_id: uuid.UUID | str) -> Application:
    ttl = settings.AUTH_CACHE_SECONDS
    hit = _app_cache.get(str(application_id)) if ttl else None
    if hit and hit[0] > time.monotonic():
        return hit[1]
    application = Application.objects.get(pk=application_id)
    if ttl:
        _app_cache[str(application_id)] = (time.monotonic() + ttl, application)
    return application


def current_application(application_id: uuid.UUID | str, *, updated_at: datetime) -> Application:
    """The application as of `updated_at` (which the caller read from the database in the same
    statement as its task): served from the cache unless it changed since, with no TTL."""
    hit = _app_cache.get(str(application_id))
    if hit and hit[1].updated_at == updated_at:
        return hit[1]
    application = Application.objects.get(pk=application_id)
    _app_cache[str(application_id)] = (time.monotonic() + settings.AUTH_CACHE_SECONDS, application)
    return application


@dataclass(frozen=True)
class CreatedApplication:
    application: Application
    api_key: str
    webhook_secret: str


def validate_runner(runner: str) -> None:
    try:
        resolve_runner(runner)
    except Exception as exc:  # import errors of custom runners surface as any exception
        raise InvalidApplication("runner", str(exc)) from exc


@transaction.atomic
def create_application(
    *,
    name: str,
    runner: str,
    runner_config: dict[str, Any] | None = None,
    retry_schedule: list[int] | str | None = None,
    retention_hours: int = 24,
) -> CreatedApplication:
    if not name.strip():
        raise InvalidApplication("name", "the name must not be empty")
    validate_runner(runner)
    if runner_config is not None and not isinstance(runner_config, dict):
        raise InvalidApplication("runner_config", "must be a JSON object")
    try:
        schedule = retry_policy.parse_schedule(
            retry_schedule if retry_schedule is not None else list(retry_policy.DEFAULT_SCHEDULE)
        )
    except retry_policy.InvalidSchedule as exc:
        raise InvalidApplication("retry_schedule", str(exc)) from exc
    if not 1 <= retention_hours <= 365 * 24:
        raise InvalidApplication("retention_hours", "must be between 1 and 8760 hours")
    secret = credentials.new_webhook_secret()
    application = Application.objects.create(
        name=name.strip(),
        runner=runner,
        runner_config=runner_config or {},
        retry_schedule=schedule,
        retention_hours=retention_hours,
        webhook_secret=secret,
    )
    issued = credentials.issue_api_key(application_id=application.id)
    return CreatedApplication(application=application, api_key=issued.raw, webhook_secret=secret)


@transaction.atomic
def rotate_webhook_secret(*, application_id: uuid.UUID | str, grace_hours: float = 24) -> str:
    """Issue a new secret; the old one keeps signing (second signature) for `grace_hours`."""
    application = Application.objects.select_for_update().get(pk=application_id)
    new_secret = credentials.new_webhook_secret()
    application.previous_webhook_secret = application.webhook_secret if grace_hours > 0 else ""
    application.previous_secret_expires_at = (
        timezone.now() + timedelta(hours=grace_hours) if grace_hours > 0 else None
    )
    application.webhook_secret = new_secret
    application.save(
        update_fields=[
            "webhook_secret", "previous_webhook_secret", "previous_secret_expires_at", "updated_at"
        ]
    )  # fmt: skip
    return new_secret


@transaction.atomic
def rotate_api_key(*, application_id: uuid.UUID | str, grace_hours: float = 24) -> str:
    """Issue a new API key; the current keys stay valid for `grace_hours`, then stop."""
    Application.objects.select_for_update().get(pk=application_id)
    now = timezone.now()
    ApiKey.objects.filter(
        application_id=application_id, revoked_at__isnull=True, expires_at__isnull=True
    ).update(expires_at=now + timedelta(hours=grace_hours))
    return credentials.issue_api_key(application_id=application_id).raw
