"""Creating applications and rotating their credentials."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Field, Q
from django.utils import timezone

from tasks import credentials
from tasks.delivery import retry_policy
from tasks.execution.runners import resolve_runner
from tasks.models import ApiKey, Application

MAX_GRACE_HOURS = 365 * 24


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


# What an operator may change: the dashboard's settings form and `createapplication` /
# `setapplication` take exactly these, validated by clean_settings.
SETTINGS = (
    "name", "runner", "runner_config", "retry_schedule", "callback_timeout_seconds",
    "blocking_timeout_seconds", "job_timeout_seconds", "task_retries", "max_concurrency",
    "queue_threshold_seconds", "run_threshold_seconds", "rate_limit_per_second",
    "rate_limit_burst", "retention_hours", "endpoint_max_in_flight",
    # Scheduling (tasks.scheduling, tasks.execution.deadlines, tasks.execution.auto_retry).
    "default_priority", "max_concurrency_per_key", "max_queue_seconds", "auto_retry",
    "auto_retry_backoff_seconds",
)  # fmt: skip

# Settings where 0, like empty, means none (no cap, no bound): NULL is how the model says it.
ZERO_IS_NONE = ("max_concurrency", "max_concurrency_per_key", "max_queue_seconds")


def validate_runner(runner: str) -> None:
    try:
        resolve_runner(runner)
    except Exception as exc:  # import errors of custom runners surface as any exception
        raise InvalidApplication("runner", str(exc)) from exc


def clean_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` checked and converted as the dashboard form and the model's validators do (a
    value may be a string, as from the command line); InvalidApplication names the first bad one."""
    for name in changes:
        if name not in SETTINGS:
            raise InvalidApplication(name, "not an application setting")
    return {name: _clean_setting(name, value) for name, value in changes.items()}


def _clean_setting(name: str, value: Any) -> Any:
    if name == "retry_schedule":  # [] is allowed (no retries): the model's blank check is not
        try:
            return retry_policy.parse_schedule(value)
        except retry_policy.InvalidSchedule as exc:
            raise InvalidApplication(name, str(exc)) from exc
    if name in ("name", "runner"):
        value = str(value).strip()
        if not value:
            raise InvalidApplication(name, f"the {name} must not be empty")
        if name == "runner":
            validate_runner(value)
    elif name == "runner_config":
        value = {} if value in (None, "") else value
        if not isinstance(value, dict):
            raise InvalidApplication(name, "must be a JSON object")
    elif name in ZERO_IS_NONE and value in (0, "0"):
        value = None
    field = Application._meta.get_field(name)
    assert isinstance(field, Field)  # each of SETTINGS is a field of the model's own
    try:
        return field.clean(value, None)  # the model's validators
    except ValidationError as exc:
        raise InvalidApplication(name, " ".join(exc.messages)) from exc


@transaction.atomic
def create_application(
    *,
    name: str,
    runner: str,
    runner_config: dict[str, Any] | None = None,
    retry_schedule: list[int] | str | None = None,
    retention_hours: int = 24,
    **other: Any,
) -> CreatedApplication:
    """A new application with one API key; `other` takes any other of SETTINGS."""
    cleaned = clean_settings(
        {
            "name": name,
            "runner": runner,
            "runner_config": runner_config,
            "retry_schedule": list(retry_policy.DEFAULT_SCHEDULE)
            if retry_schedule is None
            else retry_schedule,
            "retention_hours": retention_hours,
            **other,
        }
    )
    secret = credentials.new_webhook_secret()
    application = Application.objects.create(**cleaned, webhook_secret=secret)
    issued = credentials.issue_api_key(application_id=application.id)
    return CreatedApplication(application=application, api_key=issued.raw, webhook_secret=secret)


@transaction.atomic
def update_application(*, application_id: uuid.UUID | str, **changes: Any) -> Application:
    """Change some of SETTINGS. Saving bumps `updated_at`, which callback workers compare on
    every delivery (current_application); task workers and web processes cache an application
    for AUTH_CACHE_SECONDS."""
    cleaned = clean_settings(changes)
    application = Application.objects.select_for_update().get(pk=application_id)
    if not cleaned:
        return application
    for name, value in cleaned.items():
        setattr(application, name, value)
    application.save(update_fields=[*cleaned, "updated_at"])
    _app_cache.pop(str(application_id), None)
    return application


@transaction.atomic
def rotate_webhook_secret(*, application_id: uuid.UUID | str, grace_hours: float = 24) -> str:
    """Issue a new secret; the old one keeps signing (second signature) for `grace_hours`."""
    _check_grace(grace_hours)
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
    """Issue a new API key; the current keys stay valid for at most `grace_hours` (0: they stop
    now, within AUTH_CACHE_SECONDS on other web processes), then stop."""
    _check_grace(grace_hours)
    Application.objects.select_for_update().get(pk=application_id)
    deadline = timezone.now() + timedelta(hours=grace_hours)
    # Keys still in an earlier rotation's grace period are shortened too, never lengthened.
    ApiKey.objects.filter(application_id=application_id, revoked_at__isnull=True).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=deadline)
    ).update(expires_at=deadline)
    credentials.forget_cached_keys(application_id=application_id)
    return credentials.issue_api_key(application_id=application_id).raw


def _check_grace(grace_hours: float) -> None:
    if not 0 <= grace_hours <= MAX_GRACE_HOURS:
        raise InvalidApplication("grace_hours", f"must be between 0 and {MAX_GRACE_HOURS} hours")
