"""Endpoint health, circuit breaking and auto-disable (README: Endpoints).

An endpoint is an application's callback origin (tasks.delivery.endpoints.endpoint_of). Each
attempt to it, a task's callback or a batch's, is recorded by one upsert on its Endpoint row:
consecutive failures, last success and failure, since when it has been failing, and the
circuit. The counters live on the row because the hot path may afford one statement; the
success rate and latency percentiles are read from the endpoint's last attempts (indexed by
endpoint), only when a page or /metrics asks.

After the application's `circuit_failures` consecutive failures the circuit opens: its
deliveries park in the endpoint's waiting set in Redis without spending attempts (the Lua of
tasks.delivery.endpoints reads the circuit's Redis copy), and nothing is promoted from it. The
reconciler (`sweep`) turns it half-open after the probe interval (30 s, doubling to 10 min) and
enqueues the delivery that waited longest: the first delivery through is the probe. A failed
probe opens it again for twice as long; a success closes it and the waiting deliveries are
promoted oldest first. An endpoint that has been failing longer than `disable_after_hours` is
disabled: its deliveries are given up with a clear error, an audit entry and an Overview alert
say so, until an operator re-enables it.

A destination (tasks.delivery.destinations) has the same health and circuit under the same rules
and the same SQL: its row (Destination) has the same fields, is updated by one statement per
publish (`record_destination`), and is swept, disabled and re-enabled by the same code here. What
differs between the two is a `Breaker`: the model, its Redis name (tasks.delivery.endpoints keys
a destination `dest-<id>`), and how a parked delivery or publish is enqueued again.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from tasks import audit
from tasks.delivery import endpoints
from tasks.models import (
    Application,
    CallbackAttempt,
    CallbackStatus,
    Destination,
    DestinationAttempt,
    Endpoint,
    Task,
)
from tasks.plumbing import rawsql

logger = logging.getLogger(__name__)

FIRST_PROBE_SECONDS = 30
MAX_PROBE_SECONDS = 600
# A probe that has not reported by then is lost (its worker died): the next pass probes again.
PROBE_LEASE_EXTRA_SECONDS = 60
# Endpoints (and destinations) a listing or /metrics shows at most, the worst first.
HEALTH_LIMIT = 200
RECENT_ATTEMPTS = 100  # the window of the success rate and the latency percentiles
SWEEP_LIMIT = 500
DISABLED_ERROR = "endpoint disabled: it failed for longer than {hours} h without a success"

Circuit = Endpoint.Circuit
Row = Endpoint | Destination  # the same health fields on both


def split(endpoint: str) -> tuple[str, str]:
    """`<app id>|<origin>` (endpoints.endpoint_of) -> (app id, origin)."""
    application_id, _, origin = endpoint.partition("|")
    return application_id, origin


def key_of(row: Endpoint) -> str:
    return f"{row.application_id}|{row.origin}"


def destination_key(destination_id: int) -> str:
    """A destination's name in tasks.delivery.endpoints (its slots, waiting set, circuit)."""
    return f"dest-{destination_id}"


# --- what differs between endpoints and destinations ----------------------------------------------


def _probe_endpoint(endpoint: str) -> None:
    from tasks.delivery import callbacks  # callbacks records through this module

    if (parked := endpoints.oldest_parked(endpoint=endpoint)) is not None:
        callbacks.enqueue_parked(parked)


def _drain_endpoint(endpoint: str, cap: int) -> None:
    from tasks.delivery import callbacks  # callbacks records through this module

    callbacks.enqueue_promoted(endpoints.release(endpoint=endpoint, cap=cap))


def _probe_destination(name: str) -> None:
    from tasks.delivery import destinations  # destinations records through this module

    if (raw := endpoints.oldest_parked_encoded(endpoint=name)) is not None:
        destinations.enqueue_parked(destinations.ParkedPublish.decode(raw))


def _drain_destination(name: str, cap: int) -> None:
    from tasks.delivery import destinations  # destinations records through this module

    destinations.enqueue_promoted(endpoints.release_encoded(
        endpoint=name, cap=cap, index=endpoints.DESTINATIONS_WAITING_KEY))  # fmt: skip


@dataclass(frozen=True)
class Breaker:
    """One kind of delivery target with a circuit: its model, its name in
    tasks.delivery.endpoints, its label in audit entries and logs, how its oldest parked
    delivery goes out as the probe, how its parked deliveries are promoted, and the fields a
    disable and a re-enable set besides the circuit's."""

    model: type[Endpoint] | type[Destination]
    noun: str
    key: Callable[[Any], str]
    label: Callable[[Any], str]
    probe: Callable[[str], None]
    drain: Callable[[str, int], None]
    disabled_fields: dict[str, Any]
    enabled_fields: dict[str, Any]
    # Bump the application's updated_at on disable and re-enable: workers cache which of its
    # destinations are enabled against it (destinations._enabled_ids).
    touches_application: bool = False


ENDPOINT = Breaker(
    model=Endpoint, noun="endpoint", key=key_of,
    label=lambda row: f"{row.application.name}: {row.origin}",
    probe=_probe_endpoint, drain=_drain_endpoint, disabled_fields={}, enabled_fields={},
)  # fmt: skip
# A disabled destination is also not `enabled`: nothing is scheduled to it until re-enabled.
DESTINATION = Breaker(
    model=Destination, noun="destination", key=lambda row: destination_key(row.pk),
    label=lambda row: f"{row.application.name}: {row.masked_url}",
    probe=_probe_destination, drain=_drain_destination,
    disabled_fields={"enabled": False}, enabled_fields={"enabled": True},
    touches_application=True,
)  # fmt: skip


# --- recording: one statement per attempt ------------------------------------------------------


def _set_sql(table: str) -> str:
    """The SET clause both statements share: `table.col` is the row as it was."""
    q = rawsql.quote
    cf, circuit, probe = q("consecutive_failures"), q("circuit"), q("probe_interval_seconds")
    opens = (
        f"({table}.{circuit} = 'half_open'"
        f" OR ({table}.{circuit} = 'closed' AND {table}.{cf} + 1 >= %(n)s))"
    )
    return f"""
  {cf} = CASE WHEN %(ok)s THEN 0 ELSE {table}.{cf} + 1 END,
  {q("last_success_at")} = CASE WHEN %(ok)s THEN %(now)s ELSE {table}.{q("last_success_at")} END,
  {q("last_failure_at")} = CASE WHEN %(ok)s THEN {table}.{q("last_failure_at")} ELSE %(now)s END,
  {q("failing_since")} = CASE WHEN %(ok)s THEN NULL
    ELSE COALESCE({table}.{q("failing_since")}, %(now)s) END,
  {q("circuit_changed_at")} = CASE
    WHEN %(ok)s AND {table}.{circuit} <> 'closed' THEN %(now)s
    WHEN NOT %(ok)s AND {opens} THEN %(now)s
    ELSE {table}.{q("circuit_changed_at")} END,
  {probe} = CASE
    WHEN %(ok)s THEN 0
    WHEN {table}.{circuit} = 'half_open' THEN
      CASE WHEN {table}.{probe} * 2 > {MAX_PROBE_SECONDS} THEN {MAX_PROBE_SECONDS}
      ELSE {table}.{probe} * 2 END
    WHEN {opens} THEN {FIRST_PROBE_SECONDS}
    ELSE {table}.{probe} END,
  {q("next_probe_at")} = CASE WHEN %(ok)s THEN NULL ELSE {table}.{q("next_probe_at")} END,
  {circuit} = CASE WHEN %(ok)s THEN 'closed' WHEN {opens} THEN 'open' ELSE {table}.{circuit} END
"""  # identifiers from the model, values are parameters


def _returning() -> str:
    q = rawsql.quote
    return (f"RETURNING {q('id')}, {q('circuit')}, {q('circuit_changed_at')}, "
            f"{q('probe_interval_seconds')}, {q('disabled_at')}")  # fmt: skip


def _record_sql() -> str:
    """An endpoint's row is created by its first attempt: an upsert."""
    table = rawsql.quote(Endpoint._meta.db_table)
    q = rawsql.quote
    return f"""
INSERT INTO {table} ({q("application_id")}, {q("origin")}, {q("consecutive_failures")},
  {q("last_success_at")}, {q("last_failure_at")}, {q("failing_since")}, {q("circuit")},
  {q("circuit_changed_at")}, {q("next_probe_at")}, {q("probe_interval_seconds")},
  {q("disabled_at")}, {q("created_at")})
VALUES (%(app)s, %(origin)s, %(cf0)s, %(success_at)s, %(failure_at)s, %(failure_at)s,
  %(circuit0)s, %(changed0)s, NULL, %(probe0)s, NULL, %(now)s)
ON CONFLICT ({q("application_id")}, {q("origin")}) DO UPDATE SET {_set_sql(table)}
{_returning()}"""  # noqa: S608


def _update_sql() -> str:
    """A destination's row exists (it is configured): an update."""
    table = rawsql.quote(Destination._meta.db_table)
    where = f"WHERE {rawsql.quote('id')} = %(id)s"
    return f"UPDATE {table} SET {_set_sql(table)} {where} {_returning()}"  # noqa: S608


_SQL: dict[tuple[str, str], str] = {}


def _sql(noun: str) -> str:
    key = (noun, connection.vendor)
    if key not in _SQL:
        _SQL[key] = _record_sql() if noun == "endpoint" else _update_sql()
    return _SQL[key]


@dataclass(frozen=True)
class Recorded:
    endpoint_id: int  # the row's id (a destination's, for a destination)
    circuit: str
    changed: bool  # this attempt opened or closed the circuit
    disabled: bool


def record(*, endpoint: str, delivered: bool, circuit_failures: int) -> Recorded | None:
    """One attempt's outcome on its endpoint's row (created on its first attempt), and the
    circuit's Redis copy when the attempt moved it. None for an origin that is not one."""
    application_id, origin = split(endpoint)
    if not origin or origin == "invalid":
        return None
    now = timezone.now()
    opens_at_once = not delivered and circuit_failures <= 1
    at = rawsql.get_field(Endpoint, "last_success_at").get_db_prep_value(now, connection)
    params = {
        "app": rawsql.get_field(Endpoint, "application").get_db_prep_value(
            uuid.UUID(application_id), connection
        ),
        "origin": origin, "ok": delivered, "n": circuit_failures, "now": at,
        "cf0": 0 if delivered else 1,
        "success_at": at if delivered else None, "failure_at": None if delivered else at,
        "circuit0": Circuit.OPEN if opens_at_once else Circuit.CLOSED,
        "changed0": at if opens_at_once else None,
        "probe0": FIRST_PROBE_SECONDS if opens_at_once else 0,
    }  # fmt: skip
    return _recorded(ENDPOINT, endpoint, params, now)


def record_destination(
    *, destination_id: int, delivered: bool, circuit_failures: int
) -> Recorded | None:
    """One publish's outcome on its destination's row, as `record` does for an endpoint. None
    when the destination is gone."""
    now = timezone.now()
    at = rawsql.get_field(Destination, "last_success_at").get_db_prep_value(now, connection)
    params = {"id": destination_id, "ok": delivered, "n": circuit_failures, "now": at}
    return _recorded(DESTINATION, destination_key(destination_id), params, now)


def _recorded(breaker: Breaker, name: str, params: dict, now: datetime) -> Recorded | None:
    with rawsql.cursor() as db:
        db.execute(_sql(breaker.noun), params)
        row = db.fetchone()
    if row is None:
        return None
    changed_at = rawsql.from_db(rawsql.get_field(breaker.model, "circuit_changed_at"), row[2])
    recorded = Recorded(
        endpoint_id=row[0], circuit=row[1], changed=changed_at == now, disabled=row[4] is not None
    )
    extra = {breaker.noun: name}
    if recorded.disabled:
        endpoints.set_circuit(endpoint=name, circuit="disabled")
    elif recorded.circuit == Circuit.OPEN:
        if recorded.changed:
            next_probe = now + timedelta(seconds=row[3])
            breaker.model.objects.filter(pk=row[0]).update(next_probe_at=next_probe)
            logger.warning("%s circuit opened", breaker.noun, extra=extra)
        endpoints.set_circuit(endpoint=name, circuit="open")  # again, if Redis lost it
    elif recorded.changed:  # closed by this success: the waiting deliveries go on (the caller's
        endpoints.set_circuit(endpoint=name, circuit=None)  # release promotes them)
        logger.info("%s circuit closed", breaker.noun, extra=extra)
    return recorded


# --- the reconciler's pass ----------------------------------------------------------------------


@dataclass
class SweepReport:
    probes: int = 0
    disabled: int = 0
    destination_probes: int = 0
    destinations_disabled: int = 0


def sweep(*, now: datetime | None = None) -> SweepReport:
    """Disable the endpoints and destinations failing too long, start the probes that are due,
    and put each circuit's Redis copy back (Redis may have lost it: the database is the
    truth)."""
    now = now or timezone.now()
    report = SweepReport()
    report.probes, report.disabled = _sweep(ENDPOINT, now)
    report.destination_probes, report.destinations_disabled = _sweep(DESTINATION, now)
    return report


def _sweep(breaker: Breaker, now: datetime) -> tuple[int, int]:
    probes = disabled = 0
    failing = (
        breaker.model.objects.select_related("application")
        .filter(failing_since__isnull=False)
        .order_by("failing_since")[:SWEEP_LIMIT]
    )
    for row in failing:
        name = breaker.key(row)
        if row.disabled_at is not None:
            endpoints.set_circuit(endpoint=name, circuit="disabled")
            continue
        assert row.failing_since is not None
        hours = row.application.disable_after_hours
        if row.failing_since <= now - timedelta(hours=hours):
            disabled += _disable(breaker, row.pk, now=now)
            continue
        if row.circuit == Circuit.CLOSED:
            continue
        if row.next_probe_at is not None and row.next_probe_at > now:
            circuit = "open" if row.circuit == Circuit.OPEN else "half"
            endpoints.set_circuit(endpoint=name, circuit=circuit, only_if_missing=True)
            continue
        probes += _start_probe(breaker, row, now=now)
    return probes, disabled


def _start_probe(breaker: Breaker, row: Row, *, now: datetime) -> int:
    lease = row.application.callback_timeout_seconds + PROBE_LEASE_EXTRA_SECONDS
    if breaker is DESTINATION:  # connect, publish and confirm may each take the timeout
        lease += 2 * row.application.callback_timeout_seconds
    won = breaker.model.objects.filter(
        pk=row.pk, circuit=row.circuit, next_probe_at=row.next_probe_at, disabled_at__isnull=True
    ).update(circuit=Circuit.HALF_OPEN, next_probe_at=now + timedelta(seconds=lease))
    if not won:
        return 0
    name = breaker.key(row)
    endpoints.set_circuit(endpoint=name, circuit="half")  # a lost probe's claim goes too
    breaker.probe(name)
    logger.info("%s probe started", breaker.noun, extra={breaker.noun: name})
    return 1


def disable(*, endpoint_id: int, now: datetime | None = None) -> bool:
    """Failing too long: disabled, audited (actor `system`), and its waiting deliveries sent on
    to be given up. False when it was disabled already."""
    return _disable(ENDPOINT, endpoint_id, now=now or timezone.now())


def disable_destination(*, destination_id: int, now: datetime | None = None) -> bool:
    """`disable` for a destination (also no longer `enabled`)."""
    return _disable(DESTINATION, destination_id, now=now or timezone.now())


def _disable(breaker: Breaker, pk: int, *, now: datetime) -> bool:
    with transaction.atomic():
        won = breaker.model.objects.filter(pk=pk, disabled_at__isnull=True).update(
            disabled_at=now, **breaker.disabled_fields
        )
        if not won:
            return False
        row = breaker.model.objects.select_related("application").get(pk=pk)
        _touch(breaker, row, now)
        audit.record(
            user=None, username="system", action=f"{breaker.noun}.disable",
            target_type=breaker.noun, target_id=row.pk, target_label=breaker.label(row),
            detail={"failing_since": row.failing_since.isoformat() if row.failing_since else None,
                    "disable_after_hours": row.application.disable_after_hours},
        )  # fmt: skip
    name = breaker.key(row)
    endpoints.set_circuit(endpoint=name, circuit="disabled")
    breaker.drain(name, row.application.endpoint_max_in_flight)
    logger.warning("%s disabled", breaker.noun, extra={breaker.noun: name})
    return True


def _touch(breaker: Breaker, row: Row, now: datetime) -> None:
    if breaker.touches_application:
        Application.objects.filter(pk=row.application_id).update(updated_at=now)


def reenable(*, endpoint_id: int, user) -> Endpoint:
    """An operator's `Re-enable`: closed and counting from zero again, audited."""
    row = _reenable(ENDPOINT, endpoint_id, user=user)
    assert isinstance(row, Endpoint)
    return row


def reenable_destination(*, destination_id: int, user) -> Destination:
    """`reenable` for a destination: enabled again, its parked publishes going out."""
    row = _reenable(DESTINATION, destination_id, user=user)
    assert isinstance(row, Destination)
    return row


def _reenable(breaker: Breaker, pk: int, *, user) -> Row:
    with transaction.atomic():
        row = breaker.model.objects.select_for_update().select_related("application").get(pk=pk)
        was = {"disabled_at": row.disabled_at.isoformat() if row.disabled_at else None,
               "circuit": row.circuit}  # fmt: skip
        breaker.model.objects.filter(pk=row.pk).update(
            disabled_at=None, circuit=Circuit.CLOSED, consecutive_failures=0, failing_since=None,
            next_probe_at=None, probe_interval_seconds=0, circuit_changed_at=timezone.now(),
            **breaker.enabled_fields,
        )  # fmt: skip
        _touch(breaker, row, timezone.now())
        audit.record(user=user, action=f"{breaker.noun}.reenable", target_type=breaker.noun,
                     target_id=row.pk, target_label=breaker.label(row), detail=was)  # fmt: skip
    name = breaker.key(row)
    endpoints.set_circuit(endpoint=name, circuit=None)
    breaker.drain(name, row.application.endpoint_max_in_flight)
    row.refresh_from_db()
    return row


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """Over a row's last RECENT_ATTEMPTS attempts."""

    attempts: int  # in the recent window
    success_rate: float | None  # 0..1, None without attempts
    p50_ms: int | None
    p95_ms: int | None

    @classmethod
    def of(cls, recent: list[tuple[bool, int]]) -> Figures:
        """From (delivered, duration ms) pairs."""
        durations = sorted(duration for _, duration in recent)
        delivered = sum(1 for ok, _ in recent if ok)
        return cls(
            attempts=len(recent),
            success_rate=delivered / len(recent) if recent else None,
            p50_ms=percentile(durations, 0.5),
            p95_ms=percentile(durations, 0.95),
        )


def _state(row: Row) -> str:
    return "disabled" if row.disabled_at is not None else row.circuit


def _badness(row: Row, figures: Figures, name: str) -> tuple:
    """Sort key, worst first: disabled, open, half-open, then by failures and success."""
    rank = {"disabled": 0, Circuit.OPEN: 1, Circuit.HALF_OPEN: 2}.get(_state(row), 3)
    rate = figures.success_rate if figures.success_rate is not None else 1.0
    return (rank, -row.consecutive_failures, rate, name)


@dataclass(frozen=True)
class Health(Figures):
    endpoint: Endpoint

    @property
    def state(self) -> str:
        return _state(self.endpoint)

    @property
    def badness(self) -> tuple:
        return _badness(self.endpoint, self, self.endpoint.origin)


@dataclass(frozen=True)
class DestinationHealth(Figures):
    destination: Destination

    @property
    def state(self) -> str:
        return _state(self.destination)

    @property
    def badness(self) -> tuple:
        return _badness(self.destination, self, self.destination.masked_url)


def percentile(values: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def _recent(attempts) -> list[tuple[bool, int]]:
    return list(
        attempts.order_by("-started_at").values_list("delivered", "duration_ms")[:RECENT_ATTEMPTS]
    )


def health_of(row: Endpoint) -> Health:
    figures = Figures.of(_recent(CallbackAttempt.objects.filter(endpoint=row)))
    return Health(endpoint=row, **vars(figures))


def destination_health_of(row: Destination) -> DestinationHealth:
    figures = Figures.of(_recent(DestinationAttempt.objects.filter(destination=row)))
    return DestinationHealth(destination=row, **vars(figures))


def all_destination_health(
    *, application_id: uuid.UUID | str | None = None, limit: int = HEALTH_LIMIT
) -> list[DestinationHealth]:
    """The destinations' health, worst first: at most `limit` of them (all_health's choice)."""
    rows = _worst_rows(Destination.objects.select_related("application"), application_id, limit)
    return sorted((destination_health_of(row) for row in rows), key=lambda h: h.badness)


def _worst_rows(rows, application_id: uuid.UUID | str | None, limit: int) -> list:
    """The `limit` rows worst by what the rows themselves say (disabled, open, half-open, then
    consecutive failures): each row's figures cost one indexed read of its last attempts, so a
    listing reads a bounded number of them however many endpoints there are."""
    if application_id:
        rows = rows.filter(application_id=application_id)
    rank = Case(
        When(disabled_at__isnull=False, then=Value(0)),
        When(circuit=Circuit.OPEN, then=Value(1)),
        When(circuit=Circuit.HALF_OPEN, then=Value(2)),
        default=Value(3),
    )
    ordered = rows.annotate(rank=rank).order_by("rank", "-consecutive_failures", "-last_failure_at")
    return list(ordered[:limit])


def disabled_destinations() -> list[Destination]:
    """Destinations disabled for failing too long (not those an operator turned off)."""
    return list(
        Destination.objects.select_related("application")
        .filter(disabled_at__isnull=False)
        .order_by("-disabled_at")
    )


def all_health(
    *, application_id: uuid.UUID | str | None = None, limit: int = HEALTH_LIMIT
) -> list[Health]:
    """The endpoints' health, worst first: at most `limit` of them, the worst by their state
    and consecutive failures (then sorted with their success rates too)."""
    rows = _worst_rows(Endpoint.objects.select_related("application"), application_id, limit)
    return sorted((health_of(row) for row in rows), key=lambda h: h.badness)


def disabled_endpoints() -> list[Endpoint]:
    return list(
        Endpoint.objects.select_related("application")
        .filter(disabled_at__isnull=False)
        .order_by("-disabled_at")
    )


def failed_since(
    *,
    since: datetime,
    application_id: str = "",
    endpoint_id: int | None = None,
    batch_size: int = 500,
) -> Iterator[list[uuid.UUID | str]]:
    """The tasks whose callback failed and that finished since `since`, of an application or
    of one endpoint (its application's tasks whose callback URL has its origin), in batches by
    (finished_at, id)."""
    origin = ""
    if endpoint_id is not None:
        row = Endpoint.objects.get(pk=endpoint_id)
        application_id, origin = str(row.application_id), row.origin
    rows = Task.objects.filter(
        application_id=application_id, callback_status=CallbackStatus.FAILED,
        finished_at__gte=since,
    ).exclude(callback_url="")  # fmt: skip
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        page = rows
        if after is not None:
            at, pk = after
            page = page.filter(Q(finished_at__gt=at) | Q(finished_at=at, pk__gt=pk))
        found = list(page.order_by("finished_at", "pk")
                     .values_list("pk", "finished_at", "callback_url")[:batch_size])  # fmt: skip
        if not found:
            return
        last_pk, last_at, _ = found[-1]
        assert last_at is not None  # filtered on finished_at__gte
        after = (last_at, last_pk)
        ids: list[uuid.UUID | str] = [
            pk for pk, _, url in found if not origin or _origin(application_id, url) == origin
        ]
        if ids:
            yield ids


def _origin(application_id: str, url: str) -> str:
    return split(endpoints.endpoint_of(application_id=application_id, callback_url=url))[1]


def disabled_error(application: Application) -> str:
    return DISABLED_ERROR.format(hours=application.disable_after_hours)
