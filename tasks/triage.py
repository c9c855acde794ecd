"""Failure triage: the one rule that turns an error into a group (kind, fingerprint, label).

A task's error is grouped by its first line with what varies from one occurrence to the next
masked (UUIDs and hex ids -> <id>, 0x addresses -> <hex>, numbers -> <n>, quoted values that are
not plain names -> <s>, URL query strings -> ?<q>), so "TimeoutError: upstream took 31.2 s for
task 9f0c…" and "… 12.0 s for task 1ab3…" are one group, while the exception type (kept
verbatim) keeps different types apart. A callback given up on is grouped by its last HTTP status
("HTTP 503") or, without one, by the normalised error of its last attempt.

`tasks.state` stores the fingerprint in the same UPDATE that fails a run or gives a callback up,
and calls `record` to keep `ErrorGroup` (label, first/last seen) current, at most once a second
per group per process.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from datetime import datetime
from typing import NamedTuple

from django.utils import timezone

from tasks.models import CallbackAttempt, ErrorGroup, Task
from tasks.statuses import CallbackStatus, TaskStatus

TASK = ErrorGroup.Kind.TASK.value
CALLBACK = ErrorGroup.Kind.CALLBACK.value

MAX_LABEL = 300  # of the normalised text: what is fingerprinted and shown
_READ_MAX = 2000  # of the raw first line: bounds the regex work on a huge message
NO_ERROR = "(no error message)"


class Triage(NamedTuple):
    kind: str
    fingerprint: str
    label: str


# Order matters: URLs first (their query strings go whole), then quoted values, ids, addresses
# and numbers; a masked token never matches a later pattern.
_URL_QUERY = re.compile(r"\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s#'\"<>]*", re.I)
_QUOTED = re.compile(r"""(?<!\w)(['"])(.*?)\1(?!\w)""")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX_ADDRESS = re.compile(r"\b0x[0-9a-f]+\b", re.I)
# A hex run of 8+ with at least one digit: job ids, worker names, digests ("deadbeef" stays).
_HEX_ID = re.compile(r"(?<![A-Za-z0-9])(?=[0-9a-f]*\d)[0-9a-f]{8,}(?![A-Za-z0-9])", re.I)
# A number not glued to a name before it (utf8, md5, HTTP2Error stay), with its decimals and
# its :port or :line; a sign only where it starts a value ("in -3 s", not "task-3").
_NUMBER = re.compile(r"(?:(?<![^\s(\[=])[-+])?(?<![A-Za-z0-9_])\d+(?:[.:,]\d+)*")
_SPACE = re.compile(r"\s+")


def _mask_quoted(match: re.Match[str]) -> str:
    quote, inner = match.group(1), match.group(2)
    return match.group(0) if _PLAIN_NAME.fullmatch(inner) else f"{quote}<s>{quote}"


def normalise(text: str) -> str:
    """The first non-empty line of an error with its variable parts masked, whitespace
    collapsed, at most MAX_LABEL characters ("" for an empty error)."""
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    line = line[:_READ_MAX]
    line = _URL_QUERY.sub(r"\1?<q>", line)
    line = _QUOTED.sub(_mask_quoted, line)
    line = _UUID.sub("<id>", line)
    line = _HEX_ADDRESS.sub("<hex>", line)
    line = _HEX_ID.sub("<id>", line)
    line = _NUMBER.sub("<n>", line)
    return _SPACE.sub(" ", line).strip()[:MAX_LABEL]


def fingerprint(kind: str, normalised: str) -> str:
    """16 hex characters naming (kind, normalised text)."""
    return hashlib.blake2b(f"{kind}\n{normalised}".encode(), digest_size=8).hexdigest()


def task_error(error: str) -> Triage:
    """The group of a failed run's error (as tasks.state.fail stores it)."""
    label = normalise(error) or NO_ERROR
    return Triage(TASK, fingerprint(TASK, label), label)


def callback_error(*, status_code: int | None, error: str = "") -> Triage:
    """The group of a callback given up on: its last HTTP status, else its last attempt's
    error."""
    label = f"HTTP {status_code}" if status_code else (normalise(error) or NO_ERROR)
    return Triage(CALLBACK, fingerprint(CALLBACK, label), label)


# --- ErrorGroup: label, first and last seen -----------------------------------------------------

# A storm of identical failures bumps a group's last_seen at most once a second per process.
RECORD_INTERVAL = 1.0
_RECORDED_MAX = 10_000
_recorded: dict[tuple[str, str], float] = {}
_recorded_lock = threading.Lock()


def record(group: Triage, *, now: datetime | None = None) -> bool:
    """Upsert the group (first_seen kept, label and last_seen set): one INSERT … ON CONFLICT,
    skipped when this process wrote the same group less than RECORD_INTERVAL ago. Returns
    whether it wrote."""
    key = (group.kind, group.fingerprint)
    tick = time.monotonic()
    with _recorded_lock:
        if key in _recorded and tick - _recorded[key] < RECORD_INTERVAL:
            return False
        if len(_recorded) >= _RECORDED_MAX:
            _recorded.clear()
        _recorded[key] = tick
    seen = now or timezone.now()
    ErrorGroup.objects.bulk_create(
        [ErrorGroup(kind=group.kind, fingerprint=group.fingerprint, label=group.label,
                    first_seen=seen, last_seen=seen)],
        update_conflicts=True, unique_fields=["kind", "fingerprint"],
        update_fields=["label", "last_seen"],
    )  # fmt: skip
    return True


def forget_recorded() -> None:
    """Drop this process's memory of written groups (tests; a process that forks)."""
    with _recorded_lock:
        _recorded.clear()


# --- failed rows without a fingerprint (written before triage existed) --------------------------


class BackfillReport(NamedTuple):
    tasks: int
    callbacks: int


def backfill(*, batch: int = 500, batches: int = 10) -> BackfillReport:
    """Fingerprint failed tasks and given-up callbacks that have none, at most `batches`
    batches of `batch` rows of each a call (the cron process calls it every minute until none
    are left). Each batch is one range of a partial index (status failed, fingerprint ''), so a
    call is bounded whatever the table holds; a row retried meanwhile is left alone."""
    tasks = callbacks = 0
    for _ in range(batches):
        done_tasks, done_callbacks = _backfill_tasks(batch), _backfill_callbacks(batch)
        tasks, callbacks = tasks + done_tasks, callbacks + done_callbacks
        if done_tasks < batch and done_callbacks < batch:
            break
    return BackfillReport(tasks, callbacks)


def _backfill_tasks(batch: int) -> int:
    guard = {"status": TaskStatus.FAILED, "error_fingerprint": ""}
    # Ordered as the partial index is, so both backends walk it rather than scan the table.
    found = Task.objects.filter(**guard).order_by("-finished_at")
    rows = list(found.values_list("pk", "error", "finished_at")[:batch])
    _store("error_fingerprint", guard, [(task_error(error), pk, at) for pk, error, at in rows])
    return len(rows)


def _backfill_callbacks(batch: int) -> int:
    guard = {"callback_status": CallbackStatus.FAILED, "callback_error_fingerprint": ""}
    rows = list(
        Task.objects.filter(**guard)
        .order_by("-finished_at")
        .values_list("pk", "run", "callback_last_status_code", "finished_at")[:batch]
    )
    found = []
    for pk, run, status_code, at in rows:
        error = ""
        if status_code is None:  # the last attempt's error: a callback_attempt_unique range
            last = (
                CallbackAttempt.objects.filter(task_id=pk, run=run)
                .order_by("-number")
                .values_list("error", "started_at")
                .first()
            )
            if last:
                error, at = last
        found.append((callback_error(status_code=status_code, error=error), pk, at))
    _store("callback_error_fingerprint", guard, found)
    return len(rows)


def _store(column: str, guard: dict, rows: list[tuple[Triage, uuid.UUID, datetime | None]]) -> None:
    members: dict[Triage, list[uuid.UUID]] = {}
    seen: dict[Triage, tuple[datetime, datetime]] = {}
    for group, pk, at in rows:
        members.setdefault(group, []).append(pk)
        when = at or timezone.now()
        first, last = seen.get(group, (when, when))
        seen[group] = (min(first, when), max(last, when))
    for group, pks in members.items():
        Task.objects.filter(pk__in=pks, **guard).update(**{column: group.fingerprint})
        first, last = seen[group]
        ErrorGroup.objects.bulk_create(
            [ErrorGroup(kind=group.kind, fingerprint=group.fingerprint, label=group.label,
                        first_seen=first, last_seen=last)],
            ignore_conflicts=True,
        )  # fmt: skip
        # An existing group keeps its times, widened to the rows found here (never narrowed).
        existing = ErrorGroup.objects.filter(kind=group.kind, fingerprint=group.fingerprint)
        existing.filter(first_seen__gt=first).update(first_seen=first)
        existing.filter(last_seen__lt=last).update(last_seen=last)
