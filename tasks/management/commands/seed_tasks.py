"""Synthetic load: N tasks over the last D days with callback attempts, failures in error groups,
some batches and one callback endpoint per application.

    python manage.py seed_tasks 10000000 --days 30 --apps 50

For measuring the dashboard and retention at scale (bench/dashboard.py, bench/retention.py);
never run it on production data. On PostgreSQL the rows go by `COPY ... FROM STDIN` (as
tasks.batches.store stores a batch's items), with the task table's secondary indexes dropped
for a large load and built once at the end; elsewhere by executemany, a chunk at a time.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import random
import time
import uuid
from bisect import bisect
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection, transaction
from django.db.models import Field, Model
from django.utils import timezone

from tasks import audit, triage
from tasks.applications import create_application
from tasks.models import Application, Batch, CallbackAttempt, Endpoint, ErrorGroup, Task
from tasks.plumbing import rawsql

# Tasks older than RECENT are finished (a real queue drains); the last minutes hold the work in
# flight as well, for some applications.
FINISHED_MIX = [("succeeded", 0.88), ("failed", 0.10), ("cancelled", 0.02)]
RECENT_MIX = [("succeeded", 0.55), ("failed", 0.06), ("cancelled", 0.01), ("pending", 0.28),
              ("running", 0.10)]  # fmt: skip
RECENT = timedelta(minutes=10)
# Of one application in BUSY_SHARE: the work in flight is a few applications' (the others'
# Overview alerts would all say "stuck" by the time a benchmark reads a large load).
BUSY_SHARE = 10
# Runner errors as they arrive: the numbers and ids vary, so triage folds each template into
# one group (the three HTTP ones into one: 10 groups, a few large and a long tail by the
# weights). An id has a digit and a quoted value starts with one, as triage's masks want.
ERRORS = [
    ("upstream answered HTTP 500 after {n} ms", 30),
    ("TimeoutError: upstream took {n}.{m} s for task {hex}", 20),
    ("ConnectionResetError: [Errno 104] Connection reset by peer ({n} bytes read)", 12),
    ("RateLimited: upstream answered 429, retry after {n} s", 10),
    ("KeyError: 'answer' in response {hex}", 8),
    ("ValueError: invalid literal for int() with base 10: '{n}x'", 6),
    ("upstream answered HTTP 502 after {n} ms", 5),
    ("upstream answered HTTP 503 after {n} ms", 4),
    ("JSONDecodeError: Expecting value: line {n} column {m} (char {n})", 2),
    ("PermissionError: token for user {n} expired", 1),
    ("RuntimeError: model context length {n} exceeded by {m} tokens", 1),
    ("MemoryError: worker {hex} out of memory", 1),
]
CALLBACK_FAILURE_CODES = [(500, 5), (502, 2), (503, 2), (404, 1)]
CALLBACK_SHARE = 0.5  # of the succeeded and failed tasks, those with a callback URL
CALLBACK_FAILED_SHARE = 0.05  # of those, the callbacks given up on
BATCH_SHARE = 0.05  # of the tasks, items of a batch
BATCH_SIZES = (100, 1000)
CHUNK = 20_000  # rows per COPY (or per executemany transaction): bounds the memory held
DEFER_INDEXES_AT = 200_000  # PostgreSQL: from this many rows, indexes built after the load


class Command(BaseCommand):
    help = "Bulk-load N synthetic tasks (attempts, error groups, batches) for load testing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("count", type=int)
        parser.add_argument("--apps", type=int, default=5, help="spread over this many apps")
        parser.add_argument("--days", type=float, default=30, help="created over the last N days")
        parser.add_argument("--batch", type=int, default=CHUNK, help="rows per write")
        parser.add_argument("--seed", type=int, default=7)
        parser.add_argument(
            "--defer-indexes", action="store_true",
            help=f"PostgreSQL: drop the task table's secondary indexes for the load and build "
                 f"them after it (the default from {DEFER_INDEXES_AT:,} rows, when the load "
                 f"is at least as large as the table)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        count, chunk = options["count"], options["batch"]
        if count < 1 or chunk < 1 or options["apps"] < 1 or options["days"] <= 0:
            raise CommandError("count, --apps, --days and --batch must be positive")
        rng = random.Random(options["seed"])
        apps = seed_applications(options["apps"])
        started = time.monotonic()
        postgresql = connection.vendor == "postgresql"
        # Building the indexes again costs the whole table: worth it for a load at least as
        # large as what the table holds, not for topping up a large one.
        defer = postgresql and (
            options["defer_indexes"] or count >= max(DEFER_INDEXES_AT, estimated_rows(Task))
        )
        seeder = Seeder(rng, apps, days=options["days"], count=count)
        made = 0
        with deferred_indexes(Task, enabled=defer, say=self.stdout.write), unchecked(defer):
            while made < count:
                n = min(chunk, count - made)
                attempts, batches = seeder.rows(CallbackAttempt), seeder.rows(Batch)
                with transaction.atomic():
                    # The task rows stream to the server as they are made (it stores one part
                    # while the next is generated); the attempts and batches they produced follow.
                    write(seeder.rows(Task), seeder.tasks(made, n, attempts, batches))
                    write(batches, batches.rows)
                    write(attempts, attempts.rows)
                made += n
                if made % (chunk * 25) < chunk or made == count:
                    rate = made / (time.monotonic() - started)
                    self.stdout.write(f"{made} tasks ({rate:.0f}/s)")
        seeder.finish()
        # Planner statistics (and, on PostgreSQL, the visibility map that lets a count be an
        # index-only scan) for what was just loaded: until autovacuum gets to it, PostgreSQL
        # would plan against the old row counts and a benchmark would measure the wrong plan.
        with connection.cursor() as cursor:
            for model in (Task, CallbackAttempt, Batch, ErrorGroup, Endpoint):
                table = connection.ops.quote_name(model._meta.db_table)
                # VACUUM cannot run in a transaction (a test's): ANALYZE alone there.
                vacuum = postgresql and not connection.in_atomic_block
                cursor.execute(f"VACUUM ANALYZE {table}" if vacuum else f"ANALYZE {table}")
        names = [app.name for app in apps]
        audit.record_command(command="seed_tasks", action="seed.tasks", target_type="seed",
                             detail={"tasks": count, "applications": names})  # fmt: skip
        minutes = (time.monotonic() - started) / 60
        self.stdout.write(f"seeded {count} tasks over {len(apps)} applications "
                          f"in {minutes:.1f} min")  # fmt: skip


def estimated_rows(model: type[Model]) -> int:
    """PostgreSQL's estimate of a table's rows (its statistics; no count of millions)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE relname = %s", [model._meta.db_table])
        found = cursor.fetchone()
    return max(0, int(found[0])) if found else 0


def seed_applications(count: int) -> list[Application]:
    apps = list(Application.objects.filter(name__startswith="seed-").order_by("created_at")[:count])
    while len(apps) < count:
        apps.append(create_application(name=f"seed-{len(apps) + 1}", runner="echo").application)
    return apps


class Rows:
    """A model's rows as text, the form both backends take: COPY's text format on PostgreSQL
    (tab-separated, `\\N` for NULL), executemany's parameters elsewhere (SQLite converts by its
    columns' affinity). A row is a copy of a template (every concrete field's default) with its
    own columns set by position (`at`)."""

    def __init__(self, model: type[Model], defaults: dict[str, Any]) -> None:
        self.model = model
        self.fields: tuple[Field, ...] = tuple(
            f for f in model._meta.concrete_fields if not getattr(f, "db_returning", False)
        )
        sample = model(**defaults)
        self.template = [text(f.get_prep_value(f.pre_save(sample, True)), f)
                         for f in self.fields]  # fmt: skip
        self.at = {f.attname: i for i, f in enumerate(self.fields)}
        self.rows: list[list[str | None]] = []

    def new(self) -> list[str | None]:
        row = self.template.copy()
        self.rows.append(row)
        return row

    def empty(self) -> Rows:
        """The same table's template with no rows (a template is built once)."""
        fresh = copy.copy(self)
        fresh.rows = []
        return fresh


def text(value: Any, field: Field) -> str | None:
    """A prepared default as the row's text."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, datetime):
        return stamp(value.timestamp())
    if field.get_internal_type() == "JSONField":
        return json.dumps(value)
    return str(value)


POSTGRESQL = connection.vendor == "postgresql"
NULL = "\\N" if POSTGRESQL else None
# Timestamps: naive UTC text as Django stores them on SQLite; with their offset for
# PostgreSQL's timestamptz.


_SECONDS: dict[int, str] = {}  # "YYYY-MM-DD HH:MM:SS" of the seconds just written


def stamp(epoch: float) -> str:
    """The text of an instant, to the microsecond. The rows come in time order, so their
    seconds repeat: each one's text is formatted once (a datetime's isoformat per value was a
    fifth of the generation's time)."""
    second = int(epoch)
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) > 100_000:
            _SECONDS.clear()
        text = _SECONDS[second] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
    micro = int((epoch - second) * 1_000_000)
    return f"{text}.{micro:06d}+00" if POSTGRESQL else f"{text}.{micro:06d}"


def write(rows: Rows, source: Iterable[list[str | None]]) -> None:
    """Insert the rows `source` yields into `rows`' table."""
    table = rawsql.quote(rows.model._meta.db_table)
    columns = ", ".join(rawsql.quote_column(field) for field in rows.fields)
    with connection.cursor() as cursor:
        if POSTGRESQL:
            # Django's cursor wraps psycopg's, whose `copy` it does not expose; identifiers come
            # from the model, the rows are data on the stream (no value holds a tab, a newline
            # or a backslash, so none needs escaping).
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as stream:
                source = iter(source)
                while part := list(itertools.islice(source, 1000)):
                    stream.write("".join("\t".join(row) + "\n" for row in part))  # type: ignore[arg-type]
        else:
            marks = ", ".join(["%s"] * len(rows.fields))
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(source))  # noqa: S608


@contextlib.contextmanager
def unchecked(enabled: bool) -> Iterator[None]:
    """PostgreSQL, a large load: no foreign-key trigger per row (a lookup of the application,
    the batch, the task for each row, a third of the load's time). The rows are consistent by
    construction. Needs a superuser; without one the checks stay."""
    if not enabled:
        yield
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")
    except DatabaseError:
        yield
        return
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = DEFAULT")


class deferred_indexes:
    """Drop `model`'s Meta indexes (not its primary key or constraints) for a bulk load and
    create them again after it, whatever happened: one sort per index instead of a B-tree
    insertion per row per index, which is most of the cost of loading millions of rows."""

    def __init__(self, model: type[Model], *, enabled: bool, say: Callable[[str], Any]) -> None:
        self.model, self.enabled, self.say = model, enabled, say

    def __enter__(self) -> None:
        if not self.enabled:
            return
        with connection.schema_editor(atomic=False) as editor:
            for index in self.model._meta.indexes:
                editor.execute(f"DROP INDEX IF EXISTS {editor.quote_name(index.name)}")

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        started = time.monotonic()
        with connection.cursor() as cursor:
            # A session setting: larger sorts in memory for the index builds below.
            cursor.execute("SET maintenance_work_mem = '1GB'")
        with connection.schema_editor(atomic=False) as editor:
            for index in self.model._meta.indexes:
                editor.add_index(self.model, index)
        self.say(f"indexes built in {time.monotonic() - started:.0f} s")


class Seeder:
    """The rows, generated in creation order: tasks spread evenly over the span (each one a
    random instant of its slot), so the time-ordered ids (UUID version 7, as a batch's items
    get) and every index on the creation time grow at their end rather than on random pages."""

    def __init__(self, rng: random.Random, apps: list[Application], *, days: float,
                 count: int) -> None:  # fmt: skip
        self.rng, self.apps, self.count = rng, apps, count
        self.now = time.time()
        self.start = self.now - days * 86400
        self.step = days * 86400 / count
        self.app_ids = [app.pk.hex for app in apps]
        self.task_errors = [(template, triage.task_error(template.format(n=1, m=2, hex="0f1e2d3c")))
                            for template, _ in ERRORS]  # fmt: skip
        self.error_weights = _cumulative(weight for _, weight in ERRORS)
        self.codes = [code for code, _ in CALLBACK_FAILURE_CODES]
        self.code_groups = [triage.callback_error(status_code=code) for code in self.codes]
        self.code_weights = _cumulative(weight for _, weight in CALLBACK_FAILURE_CODES)
        self.seen: dict[tuple[str, str], tuple[str, float, float]] = {}
        self.endpoints = self._endpoints()
        self.batch_left = 0  # items still to make of the current batch
        self.batch: tuple[str, int, int] = ("", 0, 0)  # (id, application's index, next index)
        app = apps[0]
        self.templates: dict[type[Model], Rows] = {
            Task: Rows(Task, {"application_id": app.pk}),
            CallbackAttempt: Rows(CallbackAttempt, {
                "task_id": uuid.UUID(int=0), "run": 1, "number": 1, "trigger": "auto",
                "started_at": timezone.now(), "duration_ms": 1, "delivered": True}),
            Batch: Rows(Batch, {"application_id": app.pk, "total": 1}),
        }  # fmt: skip

    def _endpoints(self) -> list[tuple[str, str]]:
        """One callback origin per application (its Endpoint row): (endpoint id, URL) by the
        application's index."""
        found = []
        for index, app in enumerate(self.apps):
            host = f"hooks-{index + 1}.client.example"
            row, _ = Endpoint.objects.get_or_create(application=app, origin=f"https://{host}:443")
            found.append((str(row.pk), f"https://{host}/hook"))
        return found

    def rows(self, model: type[Model]) -> Rows:
        """An empty set of `model`'s rows to fill."""
        return self.templates[model].empty()

    def tasks(
        self, first: int, n: int, attempts: Rows, batches: Rows
    ) -> Iterator[list[str | None]]:
        """Tasks `first` to `first + n` (of `count`), one row at a time; their callback attempts
        and the batches they start go into `attempts` and `batches`."""
        rng, now, step, start = self.rng, self.now, self.step, self.start
        random_, bits = rng.random, rng.getrandbits
        template, at = self.templates[Task].template, self.templates[Task].at
        t_id, t_app, t_status, t_inputs, t_user = (at["id"], at["application_id"], at["status"],
                                                   at["inputs"], at["user"])  # fmt: skip
        t_created, t_queued = at["created_at"], at["queued_at"]
        t_started, t_finished = at["started_at"], at["finished_at"]
        t_worker, t_progress, t_output, t_error, t_fp = (at["worker_name"], at["progress"],
                                                          at["output"], at["error"],
                                                          at["error_fingerprint"])  # fmt: skip
        t_batch, t_index = at["batch_id"], at["batch_index"]
        recent_from = now - RECENT.total_seconds()
        # A batch ends before the work in flight: every item of one is finished.
        batch_before = recent_from - step * BATCH_SIZES[1]
        finished_cum = _cumulative(weight for _, weight in FINISHED_MIX)
        finished_names = [name for name, _ in FINISHED_MIX]
        recent_cum = _cumulative(weight for _, weight in RECENT_MIX)
        recent_names = [name for name, _ in RECENT_MIX]
        errors, error_cum = self.task_errors, self.error_weights
        apps = len(self.apps)
        busy_apps = max(1, apps // BUSY_SHARE)
        batch_chance = BATCH_SHARE / ((BATCH_SIZES[0] + BATCH_SIZES[1]) / 2)
        for i in range(first, first + n):
            created = start + step * (i + random_())
            if self.batch_left:
                batch_id, app_index, index = self.batch
                self.batch = (batch_id, app_index, index + 1)
                self.batch_left -= 1
            else:
                app_index = int(random_() * apps)
                batch_id, index = "", 0
                if created < batch_before and random_() < batch_chance:
                    batch_id = self._start_batch(batches, app_index, created)
            if created >= recent_from and app_index < busy_apps:
                status = recent_names[bisect(recent_cum, random_())]
            else:
                status = finished_names[bisect(finished_cum, random_())]
            task_id = _uuid7(created, bits)
            row = template.copy()
            row[t_id] = task_id
            row[t_app] = self.app_ids[app_index]
            row[t_status] = status
            row[t_inputs] = f'{{"query": "question {i}", "n": {i}}}'
            row[t_user] = f"customer_{int(random_() * 50_000):05d}"
            row[t_created] = row[t_queued] = stamp(created)
            if batch_id:
                row[t_batch], row[t_index] = batch_id, str(index)
            if status == "pending":
                yield row
                continue
            row[t_started] = stamp(created + 1)
            row[t_worker] = f"worker-{i % 4}"
            if status == "running":
                yield row
                continue
            row[t_finished] = stamp(created + 2 + 3 * random_())
            row[t_progress] = "100"
            if status == "succeeded":
                row[t_output] = '{"answer": "synthetic"}'
            elif status == "failed":
                message, group = errors[bisect(error_cum, random_())]
                row[t_error] = message.format(n=1 + int(random_() * 60_000), m=i % 10,
                                              hex=f"9{bits(28):07x}")  # fmt: skip
                row[t_fp] = group.fingerprint
                self._seen(group, created)
            if status != "cancelled" and random_() < CALLBACK_SHARE:
                self._callback(row, attempts, task_id, app_index, created)
            yield row

    def _callback(self, row: list[str | None], attempts: Rows, task_id: str, app_index: int,
                  created: float) -> None:  # fmt: skip
        rng, at = self.rng, self.templates[Task].at
        endpoint_id, url = self.endpoints[app_index]
        failed = rng.random() < CALLBACK_FAILED_SHARE
        code = "200"
        row[at["callback_url"]] = url
        row[at["callback_status"]] = "delivered"
        row[at["callback_attempts"]] = "1"
        if failed:
            which = bisect(self.code_weights, rng.random())
            group, code = self.code_groups[which], str(self.codes[which])
            row[at["callback_status"]] = "failed"
            row[at["callback_error_fingerprint"]] = group.fingerprint
            self._seen(group, created)
        row[at["callback_last_status_code"]] = code
        attempt, at = attempts.new(), attempts.at
        attempt[at["task_id"]] = task_id
        attempt[at["started_at"]] = stamp(created + 5)
        attempt[at["url"]] = url
        attempt[at["status_code"]] = code
        attempt[at["duration_ms"]] = str(20 + int(rng.random() * 200))
        attempt[at["endpoint_id"]] = endpoint_id
        if failed:
            attempt[at["delivered"]] = "0"
            attempt[at["error"]] = f"receiver answered HTTP {code}"

    def _start_batch(self, batches: Rows, app_index: int, created: float) -> str:
        """A finished batch whose items are this task and the next ones (one application,
        created within the same minutes); its id."""
        total = self.rng.randint(*BATCH_SIZES)
        batch_id = _uuid7(created, self.rng.getrandbits)
        row, at = batches.new(), batches.at
        row[at["id"]], row[at["application_id"]] = batch_id, self.app_ids[app_index]
        row[at["status"]], row[at["total"]], row[at["completions"]] = "finished", str(total), "1"
        row[at["created_at"]] = stamp(created)
        row[at["finished_at"]] = stamp(created + self.step * total + 5)
        row[at["metadata"]] = '{"source": "seed"}'
        self.batch = (batch_id, app_index, 1)
        self.batch_left = total - 1
        return batch_id

    def _seen(self, group: triage.Triage, when: float) -> None:
        key = (group.kind, group.fingerprint)
        if key in self.seen:
            label, first, last = self.seen[key]
            self.seen[key] = (label, min(first, when), max(last, when))
        else:
            self.seen[key] = (group.label, when, when)

    def finish(self) -> None:
        """The error groups the failures fell into (first and last seen), and a batch cut short
        by the end of the load given the total it has."""
        for (kind, fingerprint), (label, first, last) in self.seen.items():
            ErrorGroup.objects.update_or_create(
                kind=kind, fingerprint=fingerprint,
                defaults={"label": label, "first_seen": datetime.fromtimestamp(first, UTC),
                          "last_seen": datetime.fromtimestamp(last, UTC)},
            )  # fmt: skip
        if self.batch_left:
            batch_id, _, index = self.batch
            Batch.objects.filter(pk=uuid.UUID(batch_id)).update(total=index)


def _cumulative(weights: Iterable[float]) -> list[float]:
    """Cumulative shares of `weights` (summing to 1), for bisect with a random() draw."""
    values = list(weights)
    total, running, found = sum(values), 0.0, []
    for weight in values[:-1]:
        running += weight
        found.append(running / total)
    return found


def _uuid7(epoch: float, bits: Callable[[int], int]) -> str:
    """A version 7 UUID (tasks.plumbing.ids) for that instant, as 32 hex digits."""
    return f"{int(epoch * 1000):012x}7{bits(12):03x}{0x8000000000000000 | bits(62):016x}"
