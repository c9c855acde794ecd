"""The setting flags `createapplication` and `setapplication` share, and how both print settings.

One flag per setting of the dashboard's application form; parsing only splits and maps the flag
values, tasks.applications.clean_settings validates them (the same validators as the form), and
its InvalidApplication is reported under the flag's name. (A leading underscore keeps Django from
taking this module for a command.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from tasks.applications import SETTINGS, InvalidApplication
from tasks.models import Application, Destination

NONE_WORDS = ("none", "default", "")

# flag -> (setting, metavar, help). rate_limit_per_second and rate_limit_burst share --rate-limit.
FLAGS: dict[str, tuple[str, str, str]] = {
    "--name": ("name", "NAME", "display name"),
    "--runner": ("runner", "RUNNER", "echo, sleep, fail, http, openai, dify or a.dotted.path"),
    "--runner-config": ("runner_config", "JSON", "JSON object, e.g. '{\"url\": …}'"),
    "--retry-schedule": (
        "retry_schedule", "S,S,…", "seconds between callback retries, e.g. 10,60,300; none: none"
    ),
    "--callback-timeout": ("callback_timeout_seconds", "S", "seconds a receiver has (0.5-60)"),
    "--blocking-timeout": (
        "blocking_timeout_seconds", "S", "seconds a blocking submit waits (0.1-300); default: "
        "BLOCKING_TIMEOUT"
    ),
    "--job-timeout": ("job_timeout_seconds", "S", "seconds a run may take before it is stopped"),
    "--task-retries": ("task_retries", "N", "re-runs after a lost worker (0-10)"),
    "--max-concurrency": (
        "max_concurrency", "N", "tasks queued or running at once; 0 or none: no cap"
    ),
    "--queue-threshold": ("queue_threshold_seconds", "S", "alert when pending longer than this"),
    "--run-threshold": ("run_threshold_seconds", "S", "alert when running longer than this"),
    "--rate-limit": (
        "rate_limit_per_second", "RPS[/BURST]", "per API key, e.g. 50/100; 0: unlimited"
    ),
    "--retention-hours": ("retention_hours", "N", "keep finished tasks this long (1-8760)"),
    "--endpoint-max-in-flight": (
        "endpoint_max_in_flight", "N", "deliveries in flight at once per callback origin; 0: no cap"
    ),
    "--circuit-failures": (
        "circuit_failures", "N", "consecutive failed attempts that open an endpoint's circuit "
        "(default 20)"
    ),
    "--disable-after-hours": (
        "disable_after_hours", "H", "disable an endpoint failing this long without a success "
        "(default 120)"
    ),
    "--default-priority": (
        "default_priority", "high|normal|low", "the lane of a submit that names no priority"
    ),
    "--max-concurrency-per-key": (
        "max_concurrency_per_key", "N", "runs queued or running at once per concurrency_key (else "
        "user); 0 or none: no cap"
    ),
    "--max-queue-seconds": (
        "max_queue_seconds", "S", "a run not started within S seconds (1-604800) fails with "
        "error_code deadline_exceeded; 0 or none: no bound"
    ),
    "--auto-retry": ("auto_retry", "N", "automatic retries of a retryable failure (0-10)"),
    "--auto-retry-backoff": (
        "auto_retry_backoff_seconds", "S", "seconds before the first automatic retry (0-3600), "
        "doubling for each next one"
    ),
    "--signing": (
        "signing", "hmac|ed25519|both", "how callbacks are signed: HMAC with the webhook secret "
        "(v1), Ed25519 with a key published in the JWKS (v1a), or both"
    ),
}  # fmt: skip
FLAG_OF = {setting: flag for flag, (setting, _, _) in FLAGS.items()} | {
    "rate_limit_burst": "--rate-limit",
    "destinations": "--destination",
}
NULLABLE = (
    "blocking_timeout_seconds",
    "max_concurrency",
    "max_concurrency_per_key",
    "max_queue_seconds",
)


def add_setting_arguments(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    """Every setting flag, all optional (`--runner` is required when creating; the name is the
    positional NAME there). Unset flags stay None: only the flags given change anything."""
    group = parser.add_argument_group("application settings")
    for flag, (setting, metavar, help_text) in FLAGS.items():
        if creating and flag == "--name":
            continue
        group.add_argument(
            flag,
            dest=f"setting_{setting}",
            metavar=metavar,
            default=None,
            required=creating and flag == "--runner",
            help=help_text,
        )
    group.add_argument(
        "--destination", dest="destinations", action="append", default=None, metavar="URL",
        help="also publish finished tasks to this message bus (repeatable): "
        "redis://HOST:PORT/DB?stream=NAME, amqp://USER:PASS@HOST:PORT/VHOST?exchange=E"
        "&routing_key=K or nats://HOST:PORT?subject=S",
    )  # fmt: skip
    group.add_argument(
        "--clear-destinations", action="store_true",
        help="remove every destination first (then add those of --destination, if any)",
    )  # fmt: skip


def destinations_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The destination flags given, as keyword arguments of the services."""
    given: dict[str, Any] = {}
    if options.get("destinations"):
        given["destinations"] = list(options["destinations"])
    if options.get("clear_destinations"):
        given["clear_destinations"] = True
    return given


def settings_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The settings the given flags ask for, as keyword arguments of the services."""
    changes: dict[str, Any] = {}
    for flag, (setting, _, _) in FLAGS.items():
        raw = options.get(f"setting_{setting}")
        if raw is None:
            continue
        if setting == "runner_config":
            try:
                changes[setting] = json.loads(raw)
            except ValueError as exc:
                raise CommandError(f"{flag}: not valid JSON: {exc}") from exc
        elif setting == "retry_schedule":
            changes[setting] = [] if raw.strip().lower() in NONE_WORDS else raw
        elif setting == "rate_limit_per_second":
            rate, slash, burst = raw.partition("/")
            changes["rate_limit_per_second"] = rate.strip()
            if slash:
                changes["rate_limit_burst"] = burst.strip()
        elif setting in NULLABLE and raw.strip().lower() in NONE_WORDS:
            changes[setting] = None
        else:
            changes[setting] = raw
    return changes


def invalid(exc: InvalidApplication) -> CommandError:
    """The service's complaint, under the name of the flag that set the field."""
    flag = FLAG_OF.get(exc.field, exc.field)
    return CommandError(f"{flag}: {exc.message}")


def describe(application: Application) -> dict[str, Any]:
    """Every setting by its field name, as `--json` prints it."""
    values: dict[str, Any] = {"app_id": str(application.pk)}
    values |= {name: getattr(application, name) for name in SETTINGS}
    values["destinations"] = [
        {"url": d.masked_url, "kind": d.kind, "enabled": d.enabled,
         "consecutive_failures": d.consecutive_failures}
        for d in application.destinations.all()
    ]  # fmt: skip
    values["updated_at"] = application.updated_at.isoformat()
    return values


def settings_lines(application: Application) -> list[str]:
    """Every setting, one per line, with its unit and what the empty values mean."""
    a = application
    seconds = "{:g} s".format
    rows = [
        ("app_id", str(a.pk)),
        ("name", a.name),
        ("runner", a.runner),
        ("runner_config", json.dumps(a.runner_config)),
        ("retry_schedule", ",".join(map(str, a.retry_schedule)) or "none (no retries)"),
        ("callback_timeout", seconds(a.callback_timeout_seconds)),
        ("blocking_timeout", f"default ({seconds(settings.BLOCKING_TIMEOUT)})"
         if a.blocking_timeout_seconds is None else seconds(a.blocking_timeout_seconds)),
        ("job_timeout", seconds(a.job_timeout_seconds)),
        ("task_retries", str(a.task_retries)),
        ("max_concurrency", str(a.max_concurrency) if a.max_concurrency else "none (no cap)"),
        ("default_priority", a.default_priority),
        ("concurrency_per_key", str(a.max_concurrency_per_key) if a.max_concurrency_per_key
         else "none (no cap)"),
        ("max_queue", seconds(a.max_queue_seconds) if a.max_queue_seconds
         else "none (no bound)"),
        ("auto_retry", f"{a.auto_retry} retries" if a.auto_retry else "0 (off)"),
        ("auto_retry_backoff", f"{seconds(a.auto_retry_backoff_seconds)}, doubling"),
        ("queue_threshold", seconds(a.queue_threshold_seconds)),
        ("run_threshold", seconds(a.run_threshold_seconds)),
        ("rate_limit", "0 (unlimited)" if a.rate_limit_per_second <= 0
         else f"{a.rate_limit_per_second:g}/{a.rate_limit_burst} ({a.rate_limit_per_second:g} "
              f"requests/s per API key, bursts of {a.rate_limit_burst})"),
        ("retention_hours", f"{a.retention_hours} h"),
        ("endpoint_max_in_flight", str(a.endpoint_max_in_flight) if a.endpoint_max_in_flight
         else "0 (no cap)"),
        ("circuit_failures", f"{a.circuit_failures} consecutive failures open the circuit"),
        ("disable_after_hours", f"{a.disable_after_hours} h failing disables an endpoint"),
        ("signing", a.signing if a.signing == Application.Signing.HMAC
         else f"{a.signing} (key {a.signing_key_id}, in /.well-known/taskhook/jwks.json)"),
        ("destinations", "\n".join(_destination_line(d) for d in a.destinations.all())
         or "none (webhooks only)"),
        ("updated_at", a.updated_at.isoformat()),
    ]  # fmt: skip
    indent = "\n" + " " * 25
    return [f"  {name:22} {value.replace('\n', indent)}" for name, value in rows]


def _destination_line(destination: Destination) -> str:
    health = (
        f"{destination.consecutive_failures} failing in a row"
        if destination.consecutive_failures
        else "ok"
    )
    state = health if destination.enabled else "disabled"
    return f"{destination.masked_url} ({state})"
