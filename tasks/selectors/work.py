"""The Work page: every state a piece of work can wait or run in, one list per state.

Database states are keyset-paginated on the index that serves them (see each `Tab`); the two
states that only RQ knows (task runs held by an application's concurrency cap, task runs RQ
scheduled again after an infrastructure error) are read from Redis, bounded, and mapped back to
their tasks by job id (`task-<id>-<run>`, tasks.plumbing.queueing.task_job_id).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
from django.conf import settings
from django.db.models import Prefetch, Q, QuerySet
from django.utils.dateparse import parse_datetime
from rq.defaults import RQ_KEY_PREFIX
from rq.registry import ScheduledJobRegistry
from rq.utils import as_text

from tasks.models import Application, Task
from tasks.plumbing.queueing import queue, redis_client
from tasks.selectors.task_lists import COUNT_CAP, LIST_FIELDS, TaskFilters, bounded_count
from tasks.statuses import CALLBACK_IN_FLIGHT, CallbackStatus, TaskStatus

# What RQ's RateLimit keys are called for our applications (tasks.plumbing.queueing).
RATE_LIMIT_PREFIX = "app-"
RL_KEYS = f"{RQ_KEY_PREFIX}:rl-keys"
# Redis-side lists show at most this many jobs (a page is smaller; the count says the rest).
REDIS_CAP = 1000


@dataclass(frozen=True)
class Tab:
    name: str
    label: str
    hint: str
    # Database tabs: the keyset (field, newest/soonest first = descending?) and the condition.
    order_field: str = "created_at"
    descending: bool = True
    condition: Q | None = None
    redis: bool = False
    # A condition on several callback statuses is read as one ordered index range per status,
    # merged: one IN over the (callback_status, -created_at) index would sort them all.
    split: tuple[str, ...] = ()


# The partial index task_callback_part_idx's own condition, repeated word for word so that
# SQLite (which does not prove `IN (...)` implies it) uses the index.
HAS_CALLBACK = ~Q(callback_status=CallbackStatus.NONE)


TABS: dict[str, Tab] = {
    tab.name: tab
    for tab in (
        Tab("queued", "Queued", "Pending tasks waiting for a worker, newest first.",
            condition=Q(status=TaskStatus.PENDING)),
        Tab("scheduled", "Scheduled for retry",
            "Callbacks waiting for their next automatic attempt, soonest first; below, task "
            "runs RQ holds for an infrastructure retry.",
            order_field="callback_next_attempt_at", descending=False,
            condition=Q(callback_next_attempt_at__isnull=False)),
        Tab("deferred", "Deferred",
            "Task runs held back by their application's concurrency cap, next to run first.",
            redis=True),
        # Newest first like the other lists, through task_status_idx: ordering by start time
        # would need an index of its own, rewritten by every run's start and finish.
        Tab("running", "Running", "Tasks running now, newest first.",
            condition=Q(status=TaskStatus.RUNNING)),
        Tab("failed", "Failed", "Failed tasks, newest first.",
            condition=Q(status=TaskStatus.FAILED)),
        Tab("callbacks", "Callbacks waiting",
            "Callbacks not delivered yet (pending or being delivered), newest first.",
            condition=Q(callback_status__in=CALLBACK_IN_FLIGHT) & HAS_CALLBACK,
            split=CALLBACK_IN_FLIGHT),
        Tab("given_up", "Callbacks given up",
            "Callbacks the retry policy (or an operator) gave up on, newest first.",
            condition=Q(callback_status=CallbackStatus.FAILED) & HAS_CALLBACK),
    )
}  # fmt: skip

# The application comes by its own query (prefetch_related), not a join: with a join the
# planners may start from the application and sort all its tasks instead of reading an index
# in order.
WORK_FIELDS = (
    *(name for name in LIST_FIELDS if not name.startswith("application__")),
    "worker_name",
    "callback_next_attempt_at",
)
APPLICATION_FIELDS = ("id", "name", "max_concurrency")


def tab_of(name: str) -> Tab:
    return TABS.get(name) or TABS["queued"]


# --- database tabs ------------------------------------------------------------------------------


def tab_tasks(tab: Tab, filters: TaskFilters) -> QuerySet[Task]:
    """The tab's tasks, optionally of one application (the only filter the page offers)."""
    tasks = Task.objects.filter(tab.condition) if tab.condition is not None else Task.objects.all()
    if filters.application:
        tasks = tasks.filter(application_id=filters.application)
    return tasks


def _with_application(tasks: QuerySet[Task]) -> QuerySet[Task]:
    return tasks.prefetch_related(
        Prefetch("application", queryset=Application.objects.only(*APPLICATION_FIELDS))
    )


def encode_cursor(value: datetime | float, key: str) -> str:
    raw = f"{value.isoformat() if isinstance(value, datetime) else repr(value)}|{key}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode(cursor: str) -> tuple[str, str] | None:
    try:
        value, key = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
    except (ValueError, UnicodeDecodeError):
        return None
    return value, key


@dataclass
class WorkPage:
    tab: Tab
    rows: list[Task]
    next_cursor: str | None
    size: int
    count: int = 0
    capped: bool = False
    # Redis-side rows: (task or None, job id, when it waits since / is due, extra).
    jobs: list[JobRow] = field(default_factory=list)
    jobs_count: int = 0
    redis_error: bool = False


@dataclass
class JobRow:
    job_id: str
    task: Task | None
    at: datetime
    cap: int | None = None
    holding: int | None = None  # jobs of the application queued or running (its cap's slots)


def db_page(*, tab: Tab, filters: TaskFilters, cursor: str = "", size: int = 50) -> WorkPage:
    tasks = _with_application(tab_tasks(tab, filters).only(*WORK_FIELDS))
    order = tab.order_field
    after = _decode(cursor) if cursor else None
    if after and (value := parse_datetime(after[0])):
        try:
            task_id = uuid.UUID(after[1])
        except ValueError:
            task_id = None
        if task_id is not None:
            # (order, id) past the cursor, with the bare range on `order` first so that each
            # planner reads the tab's index from the cursor on (an OR alone sends SQLite to
            # another index).
            op = "lt" if tab.descending else "gt"
            tasks = tasks.filter(**{f"{order}__{op}e": value}).filter(
                Q(**{f"{order}__{op}": value}) | Q(**{f"id__{op}": task_id})
            )
    sign = "-" if tab.descending else ""
    ordering = (f"{sign}{order}", f"{sign}id")
    if tab.split:
        rows: list[Task] = []
        for status in tab.split:
            rows += tasks.filter(callback_status=status).order_by(*ordering)[: size + 1]
        rows.sort(key=lambda task: (getattr(task, order), task.id), reverse=tab.descending)
        rows = rows[: size + 1]
    else:
        rows = list(tasks.order_by(*ordering)[: size + 1])
    next_cursor = None
    if len(rows) > size:
        last = rows[size - 1]
        next_cursor = encode_cursor(getattr(last, order), str(last.id))
    return WorkPage(tab=tab, rows=rows[:size], next_cursor=next_cursor, size=size)


# The tabs' counts stop here ("1000+"): seven capped counts are read on every view and every
# refresh, so the cap bounds what one page view costs at any table size.
TAB_COUNT_CAP = 1000


def tab_count(tab: Tab, filters: TaskFilters) -> int:
    if tab.redis:
        return min(deferred_count(application_id=filters.application), TAB_COUNT_CAP)
    return bounded_count(tab_tasks(tab, filters), cap=TAB_COUNT_CAP)


def counts(filters: TaskFilters) -> dict[str, int]:
    """Each tab's count, capped at TAB_COUNT_CAP (the page shows "1000+")."""
    result = {}
    for name, tab in TABS.items():
        try:
            result[name] = tab_count(tab, filters)
        except redis.RedisError:
            result[name] = -1
    return result


def iter_db_ids(tab: Tab, filters: TaskFilters, *, batch: int = 200) -> Iterator[list[uuid.UUID]]:
    """Every id of a database tab, in its order, in keyset batches (bulk operations)."""
    cursor = ""
    while True:
        page = db_page(tab=tab, filters=filters, cursor=cursor, size=batch)
        if page.rows:
            yield [row.id for row in page.rows]
        if not page.next_cursor:
            return
        cursor = page.next_cursor


# --- RQ: job ids back to tasks ------------------------------------------------------------------


def task_of_job(job_id: str) -> tuple[uuid.UUID, int] | None:
    """`task-<uuid>-<run>` -> (uuid, run); None for any other job."""
    if not job_id.startswith("task-"):
        return None
    body, _, run = job_id[5:].rpartition("-")
    try:
        return uuid.UUID(body), int(run)
    except ValueError:
        return None


def _tasks_by_id(job_ids: list[str]) -> dict[uuid.UUID, Task]:
    ids = [parsed[0] for job_id in job_ids if (parsed := task_of_job(job_id))]
    tasks = _with_application(Task.objects.filter(pk__in=ids).only(*WORK_FIELDS))
    return {task.id: task for task in tasks}


def _job_rows(entries: list[tuple[str, float]], **extra) -> list[JobRow]:
    tasks = _tasks_by_id([job_id for job_id, _ in entries])
    rows = []
    for job_id, score in entries:
        parsed = task_of_job(job_id)
        task = tasks.get(parsed[0]) if parsed else None
        if task is not None and parsed and task.run != parsed[1]:
            task = None  # a job of an earlier run: not this task's current work
        rows.append(JobRow(job_id=job_id, task=task, at=datetime.fromtimestamp(score, UTC),
                           **extra))  # fmt: skip
    return rows


# --- deferred: RQ's rate-limited sets -----------------------------------------------------------


def rate_limit_key(application_id: uuid.UUID | str) -> str:
    return f"{RATE_LIMIT_PREFIX}{application_id}"


def rate_limited_key(key: str) -> str:
    """Where RQ 3 keeps the jobs a RateLimit holds back (rq.rate_limit.RateLimitRegistry), a
    sorted set scored by the time they were held: the next promoted is the lowest."""
    return f"{RQ_KEY_PREFIX}:rl:{key}:rate_limited"


def allowed_key(key: str) -> str:
    return f"{RQ_KEY_PREFIX}:rl:{key}:allowed"


def _limit_keys(application_id: str = "") -> list[str]:
    if application_id:
        return [rate_limit_key(application_id)]
    keys = (as_text(key) for key in redis_client().smembers(RL_KEYS))
    return sorted(key for key in keys if key.startswith(RATE_LIMIT_PREFIX))


def deferred_count(*, application_id: str = "") -> int:
    keys = _limit_keys(application_id)
    pipe = redis_client().pipeline(transaction=False)
    for key in keys:
        pipe.zcard(rate_limited_key(key))
    return sum(pipe.execute()) if keys else 0


def _deferred_entries(
    *, application_id: str = "", after: tuple[float, str] | None = None, limit: int
) -> list[tuple[str, float, str]]:
    """(job id, held since, rate limit key), oldest held first, after `after`, at most `limit`:
    per application ZRANGEBYSCORE with a LIMIT, merged."""
    keys = _limit_keys(application_id)
    low = after[0] if after else "-inf"
    pipe = redis_client().pipeline(transaction=False)
    for key in keys:
        # Ties on the score come back too (inclusive low); the filter below drops the seen ones.
        pipe.zrangebyscore(rate_limited_key(key), low, "+inf", start=0, num=limit + 50,
                           withscores=True)  # fmt: skip
    merged = []
    for key, entries in zip(keys, pipe.execute() if keys else [], strict=True):
        for job_id, score in entries:
            job_id = as_text(job_id)
            if after and (score, job_id) <= after:
                continue
            merged.append((job_id, float(score), key))
    merged.sort(key=lambda entry: (entry[1], entry[0]))
    return merged[:limit]


def deferred_page(*, filters: TaskFilters, cursor: str = "", size: int = 50) -> WorkPage:
    tab = TABS["deferred"]
    after = None
    if cursor and (decoded := _decode(cursor)):
        try:
            after = (float(decoded[0]), decoded[1])
        except ValueError:
            after = None
    entries = _deferred_entries(application_id=filters.application, after=after, limit=size + 1)
    next_cursor = None
    if len(entries) > size:
        job_id, score, _ = entries[size - 1]
        next_cursor = encode_cursor(score, job_id)
    entries = entries[:size]
    holding = _holding({key for _, _, key in entries})
    caps = dict(
        Application.objects.filter(
            pk__in=[key.removeprefix(RATE_LIMIT_PREFIX) for key in holding]
        ).values_list("pk", "max_concurrency")
    )
    rows = _job_rows([(job_id, score) for job_id, score, _ in entries])
    for (_, _, key), row in zip(entries, rows, strict=True):
        row.holding = holding.get(key)
        row.cap = caps.get(uuid.UUID(key.removeprefix(RATE_LIMIT_PREFIX)))
    return WorkPage(tab=tab, rows=[], next_cursor=next_cursor, size=size, jobs=rows)


def _holding(keys: set[str]) -> dict[str, int]:
    if not keys:
        return {}
    ordered = sorted(keys)
    pipe = redis_client().pipeline(transaction=False)
    for key in ordered:
        pipe.zcard(allowed_key(key))
    return dict(zip(ordered, pipe.execute(), strict=True))


def iter_deferred_job_ids(*, application_id: str = "", batch: int = 200) -> Iterator[list[str]]:
    """Every deferred job id (bulk operations), oldest held first, in batches; bounded by what
    is held when each batch is read (a job moved to the front is not seen again)."""
    after = None
    seen = 0
    while seen < COUNT_CAP:
        entries = _deferred_entries(application_id=application_id, after=after, limit=batch)
        if not entries:
            return
        yield [job_id for job_id, _, _ in entries]
        seen += len(entries)
        after = (entries[-1][1], entries[-1][0])


# --- scheduled: RQ's scheduled registry of the task queue ---------------------------------------


def scheduled_registry() -> ScheduledJobRegistry:
    return ScheduledJobRegistry(queue=queue(settings.TASK_QUEUE))


def scheduled_task_jobs(*, application_id: str = "", limit: int = 100) -> tuple[list[JobRow], int]:
    """Task runs RQ scheduled again (the INFRASTRUCTURE_RETRY interval), due soonest first:
    at most `limit`, and how many the registry holds."""
    registry = scheduled_registry()
    client = redis_client()
    total = int(client.zcard(registry.key))
    found: list[tuple[bytes, float]] = client.zrange(
        registry.key, 0, REDIS_CAP - 1, withscores=True
    )  # type: ignore[assignment]
    entries = [(as_text(job_id), float(score)) for job_id, score in found]
    rows = _job_rows(entries)
    if application_id:
        rows = [row for row in rows if row.task and str(row.task.application_id) == application_id]
    return rows[:limit], total


def work_page(*, tab: Tab, filters: TaskFilters, cursor: str = "", size: int = 50) -> WorkPage:
    """One page of a tab; a Redis outage leaves the Redis part empty and says so."""
    if tab.redis:
        try:
            page = deferred_page(filters=filters, cursor=cursor, size=size)
        except redis.RedisError:
            page = WorkPage(tab=tab, rows=[], next_cursor=None, size=size, redis_error=True)
    else:
        page = db_page(tab=tab, filters=filters, cursor=cursor, size=size)
        if tab.name == "scheduled" and not cursor:
            try:
                page.jobs, page.jobs_count = scheduled_task_jobs(application_id=filters.application)
            except redis.RedisError:
                page.redis_error = True
    return page
