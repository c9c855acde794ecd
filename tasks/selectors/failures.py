"""The Failures page: error groups (tasks.triage) most recently seen first, each with its
counts over the last hour and day and the applications it hit.

Bounded at any table size: one page of ErrorGroup rows by keyset on (last_seen, id) (the
error_group_recent_idx range of one kind), then for the whole page one statement of capped
range scans of the partial index of its kind, two per group: task_failure_part_idx
(error_fingerprint, -finished_at WHERE status = failed) or task_cb_failure_part_idx
(callback_error_fingerprint, -finished_at WHERE callback_status = failed). The day's scan reads
at most COUNT_CAP index entries (the hour's are its newest), the "failed now" one at most
NOW_CAP, so a storm shows "1000+" instead of counting it; a group not seen for a day costs
NOW_CAP entries. The applications are those of the group's latest APP_SAMPLE failures.

A callback's window is its task's finish time (the index's), not the time it was given up:
with a long retry schedule a callback given up now may count under an older hour.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from tasks.models import Application, ErrorGroup, Task
from tasks.plumbing import rawsql
from tasks.statuses import CallbackStatus, TaskStatus

GROUPS_PER_PAGE = 25
COUNT_CAP = 1000  # index entries of the last day read per group at most
NOW_CAP = 100  # and of all time, for "failed now" (what "retry all" would act on)
APP_SAMPLE = 20  # latest failures per group whose applications are shown
_PER_STATEMENT = 200  # scans joined by UNION ALL in one statement (SQLite allows 500 terms)


@dataclass(frozen=True)
class KindSpec:
    """Where a kind's failures live: the status that marks them and the fingerprint column."""

    status_field: str
    failed: str
    fingerprint_field: str


KINDS: dict[str, KindSpec] = {
    ErrorGroup.Kind.TASK: KindSpec("status", TaskStatus.FAILED, "error_fingerprint"),
    ErrorGroup.Kind.CALLBACK: KindSpec(
        "callback_status", CallbackStatus.FAILED, "callback_error_fingerprint"
    ),
}


@dataclass
class GroupRow:
    group: ErrorGroup
    total: int = 0  # failed now (a retried task leaves its group), up to now_cap
    last_day: int = 0
    last_hour: int = 0
    applications: list[Application] = field(default_factory=list)
    now_cap: int = NOW_CAP

    @property
    def capped(self) -> bool:
        return self.total >= self.now_cap

    @property
    def filter_field(self) -> str:
        """The task list's filter for this group (TaskFilters)."""
        return KINDS[self.group.kind].fingerprint_field


@dataclass
class FailurePage:
    kind: str
    rows: list[GroupRow]
    next_cursor: str | None
    cap: int = COUNT_CAP


def encode_cursor(group: ErrorGroup) -> str:
    raw = f"{group.last_seen.isoformat()}|{group.pk}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, int] | None:
    try:
        seen, pk = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        when = parse_datetime(seen)
        return (when, int(pk)) if when else None
    except (ValueError, UnicodeDecodeError):
        return None


def failure_page(
    *,
    kind: str,
    cursor: str = "",
    size: int = GROUPS_PER_PAGE,
    cap: int = COUNT_CAP,
    now: datetime | None = None,
) -> FailurePage:
    """One page of `kind`'s groups, most recently seen first, after `cursor`."""
    if kind not in KINDS:
        raise ValueError(f"unknown error group kind: {kind!r}")
    groups = ErrorGroup.objects.filter(kind=kind)
    after = decode_cursor(cursor) if cursor else None
    if after:
        seen, pk = after
        groups = groups.filter(Q(last_seen__lt=seen) | Q(last_seen=seen, pk__lt=pk))
    found = list(groups.order_by("-last_seen", "-pk")[: size + 1])
    next_cursor = encode_cursor(found[size - 1]) if len(found) > size else None
    rows = [GroupRow(group) for group in found[:size]]
    _fill_counts(kind, rows, now=now or timezone.now(), cap=cap)
    _fill_applications(kind, rows)
    return FailurePage(kind=kind, rows=rows, next_cursor=next_cursor, cap=cap)


def group(*, kind: str, fingerprint: str) -> ErrorGroup | None:
    return ErrorGroup.objects.filter(kind=kind, fingerprint=fingerprint).first()


def _scan(kind: str, columns: str, limit: int, since: bool = False, of: str = "%s") -> str:
    """A capped range of the kind's partial index for one fingerprint (finished since a time
    when `since`), newest first. Parameters: the failed status, the fingerprint (unless `of`
    names the column that holds it)[, the time]."""
    spec = KINDS[kind]
    table = rawsql.quote(Task._meta.db_table)
    status = rawsql.quote_column(rawsql.get_field(Task, spec.status_field))
    fingerprint = rawsql.quote_column(rawsql.get_field(Task, spec.fingerprint_field))
    return (
        f"SELECT {columns} FROM {table} WHERE {status} = %s AND {fingerprint} = {of} "  # noqa: S608
        f"{'AND finished_at >= %s ' if since else ''}ORDER BY finished_at DESC LIMIT {int(limit)}"
    )


def _lateral(fingerprints: list[str], select: str, scans: list[str]) -> tuple[str, list]:
    """PostgreSQL: `select` over a VALUES list of (index, fingerprint) AS v(i, fp), joined to
    each of `scans` (capped index ranges reading the fingerprint from v.fp) by LATERAL. One
    statement planned once: the UNION ALL of a scan per group cost 5-8 ms of planning for 10
    groups, more than running it."""
    values = ", ".join(["(%s, %s)"] * len(fingerprints))
    params: list[Any] = [p for index, fp in enumerate(fingerprints) for p in (index, fp)]
    joins = " ".join(f"CROSS JOIN LATERAL ({scan}) AS s{n}" for n, scan in enumerate(scans))
    return f"SELECT {select} FROM (VALUES {values}) AS v(i, fp) {joins}", params  # noqa: S608


def _union(parts: list[str], params: list[list[Any]]) -> list[tuple]:
    found: list[tuple] = []
    with connection.cursor() as cursor:
        for start in range(0, len(parts), _PER_STATEMENT):
            chunk = slice(start, start + _PER_STATEMENT)
            cursor.execute(
                " UNION ALL ".join(parts[chunk]), [p for group in params[chunk] for p in group]
            )
            found.extend(cursor.fetchall())
    return found


def count_statement(kind: str, *, groups: int, now: datetime) -> tuple[str, list[Any]]:
    """The page's counting statement for `groups` made-up fingerprints (for EXPLAIN)."""
    parts, params = _count_parts(kind, [f"{i:016x}" for i in range(groups)], now, COUNT_CAP)
    return " UNION ALL ".join(parts), [p for group in params for p in group]


def _count_parts(
    kind: str, fingerprints: list[str], now: datetime, cap: int
) -> tuple[list[str], list[list[Any]]]:
    finished = Task._meta.get_field("finished_at")
    hour = finished.get_db_prep_value(now - timedelta(hours=1), connection)
    day = finished.get_db_prep_value(now - timedelta(days=1), connection)
    failed = KINDS[kind].failed
    parts, params = [], []
    for index, fingerprint in enumerate(fingerprints):
        parts.append(
            f"SELECT %s, (SELECT COUNT(*) FROM ({_scan(kind, 'finished_at', NOW_CAP)}) "  # noqa: S608
            f"AS now_{index}), COUNT(*), "
            f"COALESCE(SUM(CASE WHEN finished_at >= %s THEN 1 ELSE 0 END), 0) "
            f"FROM ({_scan(kind, 'finished_at', cap, since=True)}) AS day_{index}"
        )
        params.append([index, failed, fingerprint, hour, failed, fingerprint, day])
    return parts, params


def _fill_counts(kind: str, rows: list[GroupRow], *, now: datetime, cap: int) -> None:
    if not rows:
        return
    fingerprints = [row.group.fingerprint for row in rows]
    if connection.vendor == "postgresql":
        found = _lateral_counts(kind, fingerprints, now, cap)
    else:
        found = _union(*_count_parts(kind, fingerprints, now, cap))
    for index, total, day, hour in found:
        row = rows[int(index)]
        row.total, row.last_day, row.last_hour = int(total), int(day), int(hour)


def _lateral_counts(kind: str, fingerprints: list[str], now: datetime, cap: int) -> list[tuple]:
    finished = Task._meta.get_field("finished_at")
    hour = finished.get_db_prep_value(now - timedelta(hours=1), connection)
    day = finished.get_db_prep_value(now - timedelta(days=1), connection)
    failed = KINDS[kind].failed
    failed_now = f"SELECT COUNT(*) AS total FROM ({_scan(kind, '1', NOW_CAP, of='v.fp')}) AS n"  # noqa: S608
    last_day = (
        "SELECT COUNT(*) AS day, COALESCE(SUM(CASE WHEN finished_at >= %s THEN 1 ELSE 0 END), 0) "  # noqa: S608
        f"AS hour FROM ({_scan(kind, 'finished_at', cap, since=True, of='v.fp')}) AS d"
    )
    statement, params = _lateral(
        fingerprints, "v.i, s0.total, s1.day, s1.hour", [failed_now, last_day]
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, [*params, failed, hour, failed, day])
        return cursor.fetchall()


def _application_pairs(kind: str, fingerprints: list[str]) -> list[tuple]:
    """(group's index, application id) of the latest APP_SAMPLE failures of each group."""
    app_column = rawsql.quote(Task._meta.get_field("application").column)
    failed = KINDS[kind].failed
    if connection.vendor == "postgresql":
        scan = _scan(kind, f"{app_column} AS application_id", APP_SAMPLE, of="v.fp")
        statement, params = _lateral(fingerprints, "DISTINCT v.i, s0.application_id", [scan])
        with connection.cursor() as cursor:
            cursor.execute(statement, [*params, failed])
            return cursor.fetchall()
    parts, params = [], []
    for index, fingerprint in enumerate(fingerprints):
        parts.append(
            f"SELECT DISTINCT %s, application_id FROM "  # noqa: S608
            f"({_scan(kind, f'{app_column} AS application_id', APP_SAMPLE)}) AS apps_{index}"
        )
        params.append([index, failed, fingerprint])
    return _union(parts, params)


def _fill_applications(kind: str, rows: list[GroupRow]) -> None:
    wanted = [row for row in rows if row.total]
    if not wanted:
        return
    found = _application_pairs(kind, [row.group.fingerprint for row in wanted])
    pairs = [(int(index), uuid.UUID(str(app_id))) for index, app_id in found]
    names = {
        app.pk: app
        for app in Application.objects.filter(pk__in={app_id for _, app_id in pairs}).only(
            "id", "name"
        )
    }
    for index, app_id in pairs:
        if app_id in names:
            wanted[index].applications.append(names[app_id])
    for row in wanted:
        row.applications.sort(key=lambda app: app.name)
