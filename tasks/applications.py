"""Creating applications and rotating their credentials."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Field, Q
from django.utils import timezone

from tasks import credentials
from tasks.delivery import retry_policy, signing
from tasks.execution import upstreams
from tasks.execution.runners import RunnerError, resolve_runner
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
    # Circuit breaking and auto-disable (tasks.delivery.health).
    "circuit_failures", "disable_after_hours",
    # Scheduling (tasks.scheduling, tasks.execution.deadlines, tasks.execution.auto_retry).
    "default_priority", "max_concurrency_per_key", "max_queue_seconds", "auto_retry",
    "auto_retry_backoff_seconds",
    # Webhook signing (tasks.delivery.signing): hmac, ed25519 or both.
    "signing",
)  # fmt: skip

# Settings where 0, like empty, means none (no cap, no bound): NULL is how the model says it.
ZERO_IS_NONE = ("max_concurrency", "max_concurrency_per_key", "max_queue_seconds")


def validate_runner(runner: str) -> None:
    try:
        resolve_runner(runner)
    except Exception as exc:  # import errors of custom runners surface as any exception
        raise InvalidApplication("runner", str(exc)) from exc


def validate_runner_config(runner: str, runner_config: dict[str, Any] | None) -> None:
    """A built-in runner's config, checked as its runner reads it (tasks.execution.upstreams:
    the `openai` and `dify` runners); other runners read theirs only when they run."""
    try:
        upstreams.check_config(runner, runner_config or {})
    except RunnerError as exc:
        raise InvalidApplication("runner_config", str(exc)) from exc


def clean_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` checked and converted as the dashboard form and the model's validators do (a
    value may be a string, as from the command line); InvalidApplication names the first bad one."""
    for name in changes:
        if name not in SETTINGS:
            raise InvalidApplication(name, "not an application setting")
    cleaned = {name: _clean_setting(name, value) for name, value in changes.items()}
    if "runner" in cleaned and "runner_config" in cleaned:  # else update_application checks
        validate_runner_config(cleaned["runner"], cleaned["runner_config"])
    return cleaned


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
    elif name == "signing":
        value = str(value).strip().lower()
        if value not in Application.Signing.values:
            choices = ", ".join(Application.Signing.values)
            raise InvalidApplication(name, f"must be one of {choices}, not {value!r}")
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
    destinations: Sequence[str] = (),
    **other: Any,
) -> CreatedApplication:
    """A new application with one API key; `other` takes any other of SETTINGS, `destinations`
    the URLs of message buses it publishes to (tasks.delivery.destinations)."""
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
    application = Application(**cleaned, webhook_secret=secret)
    _ensure_signing_key(application)
    application.save(force_insert=True)
    if destinations:
        _set_destinations(application.id, add=destinations, clear=False)
    issued = credentials.issue_api_key(application_id=application.id)
    return CreatedApplication(application=application, api_key=issued.raw, webhook_secret=secret)


@transaction.atomic
def update_application(
    *,
    application_id: uuid.UUID | str,
    destinations: Sequence[str] = (),
    clear_destinations: bool = False,
    **changes: Any,
) -> Application:
    """Change some of SETTINGS, and add `destinations` (after removing all of them when
    `clear_destinations`). Saving bumps `updated_at`, which callback workers compare on every
    delivery (current_application); task workers and web processes cache an application for
    AUTH_CACHE_SECONDS."""
    cleaned = clean_settings(changes)
    if destinations or clear_destinations:
        _set_destinations(application_id, add=destinations, clear=clear_destinations)
        _app_cache.pop(str(application_id), None)
    application = Application.objects.select_for_update().get(pk=application_id)
    if not cleaned:
        return application
    if ("runner" in cleaned) != ("runner_config" in cleaned):  # one of them against the other
        validate_runner_config(
            cleaned.get("runner", application.runner),
            cleaned.get("runner_config", application.runner_config),
        )
    for name, value in cleaned.items():
        setattr(application, name, value)
    made_key = _ensure_signing_key(application)
    application.save(update_fields=[*cleaned, *made_key, "updated_at"])
    _app_cache.pop(str(application_id), None)
    return application


def _set_destinations(application_id: uuid.UUID | str, *, add: Sequence[str], clear: bool) -> None:
    from tasks.delivery import destinations  # which imports this module (cached_application)

    try:
        destinations.set_destinations(application_id=application_id, add=add, clear=clear)
    except destinations.InvalidDestination as exc:
        raise InvalidApplication("destinations", str(exc)) from exc


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


def _ensure_signing_key(application: Application) -> list[str]:
    """Give an application that signs with Ed25519 its first key; the fields set."""
    if application.signing == Application.Signing.HMAC or application.signing_key:
        return []
    application.signing_key, application.signing_key_id = credentials.new_signing_key()
    return ["signing_key", "signing_key_id"]


@transaction.atomic
def rotate_signing_key(*, application_id: uuid.UUID | str, grace_hours: float = 24) -> str:
    """Issue a new Ed25519 signing key and return its key id; the old key keeps signing (a
    second `v1a` signature) and stays in the JWKS for `grace_hours`."""
    _check_grace(grace_hours)
    least = signing.JWKS_CACHE_SECONDS / 3600
    if 0 < grace_hours < least:
        raise InvalidApplication(
            "grace_hours",
            f"must be 0 (the old key stops at once: it leaked) or at least {least:.4g} hours "
            f"({signing.JWKS_CACHE_SECONDS} s, how long receivers may cache the JWKS)",
        )
    application = Application.objects.select_for_update().get(pk=application_id)
    if application.signing == Application.Signing.HMAC:
        raise InvalidApplication(
            "signing", "the application signs with HMAC only: set signing to ed25519 or both"
        )
    keep = grace_hours > 0
    application.previous_signing_key = application.signing_key if keep else ""
    application.previous_signing_key_id = application.signing_key_id if keep else ""
    application.previous_signing_key_expires_at = (
        timezone.now() + timedelta(hours=grace_hours) if keep else None
    )
    application.signing_key, application.signing_key_id = credentials.new_signing_key()
    application.save(
        update_fields=[
            "signing_key", "signing_key_id", "previous_signing_key", "previous_signing_key_id",
            "previous_signing_key_expires_at", "updated_at",
        ]
    )  # fmt: skip
    return application.signing_key_id


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
