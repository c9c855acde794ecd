"""Scheduling (tasks.scheduling): priority lanes and their aging guard, the per-key cap and its
line, and the queue place and ETA of a waiting task. The guarantees are checked with real RQ
workers; the queue arithmetic on queues no worker listens on (`private_queues`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from rq.queue import Queue

from tasks import state
from tasks.models import Task
from tasks.plumbing.queueing import redis_client, task_job_id
from tasks.scheduling import dispatch, estimates, fairness, lanes
from tests.conftest import QUEUES, WorkerProcess, clean_redis, wait_for, wait_for_status


def submit(client, app, **body) -> str:
    response = client.post(
        f"/api/applications/{app.application.id}/generate",
        {"inputs": {}, "response_mode": "async", **body},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 200, response.content
    return response.json()["task_id"]


def poll(client, app, task_id: str):
    return client.get(f"/api/tasks/{task_id}", HTTP_AUTHORIZATION=f"Bearer {app.api_key}")


def lane_ids(priority: str) -> list[str]:
    queue = Queue(lanes.queue_name(priority), connection=redis_client())
    return queue.get_job_ids()


@pytest.fixture
def _clean(private_queues, transactional_db):
    clean_redis()
    yield
    clean_redis()


# --- submit: the fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"priority": "urgent"}, "priority"),
        ({"priority": 1}, "priority"),
        ({"concurrency_key": 7}, "concurrency_key"),
        ({"concurrency_key": "k" * 256}, "concurrency_key"),
    ],
)
def test_bad_priority_or_key_is_refused_and_nothing_is_stored(make_app, client, body, field):
    app = make_app("echo")
    response = client.post(
        f"/api/applications/{app.application.id}/generate",
        {"inputs": {}, "response_mode": "async", **body},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["field"] == field
    assert not Task.objects.exists()


def test_priority_defaults_to_the_applications_and_picks_the_lane(make_app, client, _clean):
    app = make_app("echo", default_priority="low")
    default = submit(client, app)
    high = submit(client, app, priority="high")
    assert Task.objects.get(pk=default).priority == "low"
    assert lane_ids("low") == [task_job_id(default, 1)]
    assert lane_ids("high") == [task_job_id(high, 1)]
    assert poll(client, app, high).json()["priority"] == "high"


# --- the queue place ---------------------------------------------------------------------------


def test_positions_count_the_higher_lanes_and_the_runs_ahead_in_the_lane(make_app, client, _clean):
    app = make_app("echo")
    normal = [submit(client, app) for _ in range(4)]
    high = submit(client, app, priority="high")
    low = submit(client, app, priority="low")
    positions = {tid: poll(client, app, tid).json()["queue"]["position"]
                 for tid in [*normal, high, low]}  # fmt: skip
    assert positions[high] == 0
    assert [positions[tid] for tid in normal] == [1, 2, 3, 4]
    assert positions[low] == 5

    # A worker takes two normal runs: the others move up (the head is what workers report).
    normal_lane = Queue(lanes.queue_name("normal"), connection=redis_client())
    for _ in range(2):
        lanes.note_taken(normal_lane.name, normal_lane.pop_job_id(), batching=False)
    assert poll(client, app, normal[3]).json()["queue"]["position"] == 2


def test_runs_that_leave_a_lane_otherwise_stop_counting_once_a_later_one_is_taken(
    make_app, client, _clean
):
    from tasks.services import cancel_task

    app = make_app("echo", rate_limit_per_second=0)
    ids = [submit(client, app) for _ in range(20)]
    for task_id in ids[:5]:
        cancel_task(task_id=task_id)  # RQ's cancel takes the job out of the lane
    normal_lane = Queue(lanes.queue_name("normal"), connection=redis_client())
    lanes.note_taken(normal_lane.name, normal_lane.pop_job_id(), batching=False)  # ids[5]
    assert poll(client, app, ids[9]).json()["queue"]["position"] == 3  # ids[6], [7], [8]


def test_the_eta_follows_the_drain_rate_and_sets_retry_after(make_app, client, _clean):
    app = make_app("echo")
    ids = [submit(client, app) for _ in range(30)]
    # Three runs started in each of three buckets of the window, nothing in the others: the
    # rate while draining is 3 per bucket, whatever the idle buckets.
    now = time.time()
    for seconds_ago in (0, 20, 40):
        bucket = int((now - seconds_ago) // estimates.BUCKET_SECONDS)
        redis_client().incrby(estimates.STARTED_KEY.format(bucket=bucket), 3)
    last = poll(client, app, ids[-1])
    queue = last.json()["queue"]
    assert queue["position"] == 29
    rate = 3 / estimates.BUCKET_SECONDS
    assert queue["eta_seconds"] == pytest.approx(29 / rate, abs=0.1)
    assert last["Retry-After"] == "5"  # the ETA (19.3 s), within 1-5 s
    first = poll(client, app, ids[0])
    assert first.json()["queue"] == {"position": 0, "eta_seconds": 0.0}
    assert first["Retry-After"] == "1"


def test_the_queued_event_carries_the_place(make_app, client, _clean):
    from tasks.events import stream as event_stream

    app = make_app("echo")
    submit(client, app)
    time.sleep(estimates.SNAPSHOT_SECONDS + 0.1)  # past this process's snapshot of the lanes
    second = submit(client, app)
    raw = redis_client().xrange(event_stream.stream_key(second))
    queued = event_stream.decode(raw[0])
    assert queued.event == "task.queued"
    assert '"queue":{"position":1' in queued.data.replace(" ", "")


# --- aging -------------------------------------------------------------------------------------


def test_runs_waiting_past_the_aging_bound_go_to_the_front_of_the_high_lane(
    make_app, client, _clean
):
    app = make_app("echo")
    old_low = submit(client, app, priority="low")
    old_normal = submit(client, app)
    highs = [submit(client, app, priority="high") for _ in range(3)]
    client_redis = redis_client()
    assert lanes.age(client_redis) == 0  # nothing waited long enough
    later = datetime.now(UTC) + timedelta(seconds=settings.PRIORITY_AGING_SECONDS + 1)
    assert lanes.age(client_redis, now=later) == 2
    # The aged runs are served next, the normal lane's before the low lane's.
    assert lane_ids("high") == [
        task_job_id(old_normal, 1), task_job_id(old_low, 1),
        *(task_job_id(h, 1) for h in highs),
    ]  # fmt: skip
    assert lane_ids("normal") == [] and lane_ids("low") == []
    assert poll(client, app, old_low).json()["queue"]["position"] == 0  # at the front


# --- the per-key line --------------------------------------------------------------------------


def test_runs_over_the_keys_cap_wait_in_its_line_without_a_job(make_app, client, _clean):
    app = make_app("echo", max_concurrency_per_key=2)
    first = [submit(client, app, user="alice") for _ in range(2)]
    waiting = [submit(client, app, user="alice") for _ in range(3)]
    other = submit(client, app, user="bob")
    by_key = submit(client, app, user="alice", concurrency_key="alice-batch")
    anonymous = submit(client, app)
    in_lane = lane_ids("normal")
    assert in_lane == [task_job_id(t, 1) for t in [*first, other, by_key, anonymous]]
    assert all(not redis_client().exists(f"rq:job:{task_job_id(t, 1)}") for t in waiting)
    place = poll(client, app, waiting[2]).json()["queue"]
    assert place["position"] == len(in_lane) + 2  # the lanes, then two of alice's ahead
    # The reconciler leaves them alone: they wait on purpose.
    from tasks.upkeep.reconciler import reconcile

    Task.objects.update(created_at=datetime.now(UTC) - timedelta(minutes=10))
    assert not set(reconcile().requeued) & set(waiting)

    # One of alice's first runs ends: the head of her line takes its slot and is enqueued.
    state.cancel(task_id=first[0])
    key = fairness.key_of(Task.objects.select_related("application").get(pk=first[0]))
    assert key is not None
    dispatch._pass_on(key, [task_job_id(first[0], 1)])
    assert task_job_id(waiting[0], 1) in lane_ids("normal")
    assert task_job_id(waiting[1], 1) not in lane_ids("normal")


def test_a_cancelled_run_that_held_a_slot_passes_it_on_at_once(make_app, client, _clean):
    from tasks.services import cancel_task

    app = make_app("echo", max_concurrency_per_key=1)
    first = submit(client, app, user="dora")
    second = submit(client, app, user="dora")
    assert lane_ids("normal") == [task_job_id(first, 1)]
    cancel_task(task_id=first)
    assert lane_ids("normal")[-1] == task_job_id(second, 1)


def test_refill_frees_the_slots_of_runs_that_ended_silently_and_follows_the_cap(
    make_app, client, _clean
):
    app = make_app("echo", max_concurrency_per_key=1)
    first = submit(client, app, user="carol")
    second = submit(client, app, user="carol")
    third = submit(client, app, user="carol")
    assert lane_ids("normal") == [task_job_id(first, 1)]
    # The worker running `first` was killed; the reconciler failed the task, nobody said so.
    Task.objects.filter(pk=first).update(status="failed")
    assert dispatch.refill() == 1
    assert lane_ids("normal")[-1] == task_job_id(second, 1)
    # The cap is lifted: the rest of the line goes at once.
    app.application.max_concurrency_per_key = None
    app.application.save()
    assert dispatch.refill() == 1
    assert lane_ids("normal")[-1] == task_job_id(third, 1)


# --- with real workers -------------------------------------------------------------------------


@pytest.mark.processes
def test_a_high_task_starts_before_the_low_backlog(make_app, client, live_worker):
    app = make_app("sleep")
    lows = [submit(client, app, priority="low", inputs={"seconds": 0.1}) for _ in range(30)]
    wait_for_status(lows[0], ("running", "succeeded"))
    submitted_at = datetime.now(UTC)
    high = submit(client, app, priority="high", inputs={"seconds": 0.1})
    started = wait_for_status(high, ("succeeded",)).started_at
    assert started is not None
    # At most the low run being taken at the submit's instant starts between the two.
    overtaking = Task.objects.filter(
        pk__in=lows, started_at__gt=submitted_at, started_at__lt=started
    ).count()
    assert overtaking <= 1
    assert Task.objects.filter(pk__in=lows, started_at__isnull=True).count() > 10


@pytest.mark.processes
def test_one_users_backlog_does_not_delay_another_user(make_app, client, live_worker):
    """Three workers, a cap of 2 per user: alice's 60 runs never hold more than 2 slots, and
    bob's one run, submitted after all of them, starts while most of alice's still wait."""
    extra = [WorkerProcess(QUEUES, name=f"fair-{n}") for n in range(2)]
    try:
        app = make_app("sleep", max_concurrency_per_key=2, rate_limit_per_second=0)
        alice = [submit(client, app, user="alice", inputs={"seconds": 0.1}) for _ in range(60)]
        bob = submit(client, app, user="bob", inputs={"seconds": 0.1})
        bob_task = wait_for_status(bob, ("succeeded",))
        waiting_then = (
            Task.objects.filter(pk__in=alice).exclude(started_at__lt=bob_task.started_at).count()
        )
        assert waiting_then >= 50
        wait_for(
            lambda: Task.objects.filter(pk__in=alice, status="succeeded").count() == 60,
            timeout=60,
        )
        runs = sorted(Task.objects.filter(pk__in=alice).values_list("started_at", "finished_at"))
        for index, (start, _) in enumerate(runs):
            at_once = sum(1 for s, f in runs[: index + 1] if s <= start < f)
            assert at_once <= 2, f"{at_once} of alice's runs at once at {start}"
    finally:
        for worker in extra:
            worker.stop()


@pytest.mark.processes
def test_a_worker_serves_a_low_task_that_waited_past_the_aging_bound_first(
    make_app, client, tmp_path, settings, transactional_db
):
    """Its own Redis and a worker with a 1 s aging bound: a low task that waited longer than
    that runs before the high tasks queued after it; without the guard it would run last."""
    from tasks.plumbing.queueing import redis_client as cached_client
    from tests.stack import Stack

    stack = Stack(tmp_path, PRIORITY_AGING_SECONDS="1")
    stack.start_redis()
    settings.REDIS_URL = stack.redis_url
    cached_client.cache_clear()
    try:
        app = make_app("sleep")
        low = submit(client, app, priority="low", inputs={"seconds": 0.05})
        highs = [submit(client, app, priority="high", inputs={"seconds": 0.05}) for _ in range(8)]
        time.sleep(1.5)  # the low task waits past the bound before any worker runs
        stack.start_worker("aging", lanes.lane_names())
        wait_for(lambda: Task.objects.filter(status="succeeded").count() == 9, timeout=30)
        low_start = Task.objects.get(pk=low).started_at
        assert all(low_start < Task.objects.get(pk=h).started_at for h in highs)
    finally:
        stack.close()
        cached_client.cache_clear()


@pytest.mark.processes
def test_a_waiting_task_sees_its_place_shrink_and_an_eta_from_the_real_drain(
    make_app, client, live_worker
):
    app = make_app("sleep", rate_limit_per_second=0)
    ids = [submit(client, app, inputs={"seconds": 0.1}) for _ in range(40)]
    wait_for(lambda: Task.objects.filter(pk__in=ids, status="succeeded").count() >= 3, timeout=20)

    def place_with_eta():
        # The workers write their start counts once a second (tasks.telemetry.counters).
        place = poll(client, app, ids[-1]).json()["queue"]
        return place if place and place["eta_seconds"] is not None else None

    first = wait_for(place_with_eta, timeout=10)
    assert first["position"] > 0 and first["eta_seconds"] > 0
    wait_for(lambda: Task.objects.filter(pk__in=ids, status="succeeded").count() >= 12, timeout=20)
    later = poll(client, app, ids[-1]).json()["queue"]
    assert later["position"] < first["position"]
    wait_for_status(ids[-1], ("succeeded",), timeout=30)
    assert poll(client, app, ids[-1]).json()["queue"] is None


def test_acquire_many_takes_more_runs_than_one_script_call_unpacks():
    """10,000 runs of one key (a batch's chunk): split into script calls of LINE_MANY_MAX,
    still one round trip, the first `cap` granted and the rest lined in order."""
    from types import SimpleNamespace

    clean_redis()
    application = SimpleNamespace(max_concurrency_per_key=3)
    key = fairness.Key.of(application_id="app", concurrency_key="big")
    queued_at = datetime(2026, 12, 7, tzinfo=UTC)
    runs = [SimpleNamespace(id=f"00000000-0000-0000-0000-{n:012d}", run=1, priority="normal",
                            queued_at=queued_at + timedelta(seconds=n), batch_index=None,
                            application=application)
            for n in range(10_000)]  # fmt: skip
    assert fairness.acquire_many(runs, keys=[key] * len(runs)) == [True] * 3 + [False] * 9_997
    line = [job.decode() for job in redis_client().zrange(key.line, 0, -1)]
    assert line == [task_job_id(run.id, 1) for run in runs[3:]]
    clean_redis()


def test_acquire_many_grants_the_head_then_lines_the_rest_in_order_keeping_places():
    """One script call for a chunk: runs take free slots until the first that must wait; from
    there every run joins the line in the given order, except one that holds a slot already
    (it keeps it) or is in the line already (it keeps its place)."""
    from types import SimpleNamespace

    clean_redis()
    application = SimpleNamespace(max_concurrency_per_key=2)
    key = fairness.Key.of(application_id="app", concurrency_key="one-key")

    def run(n: int, priority: str = "normal") -> SimpleNamespace:
        return SimpleNamespace(id=f"00000000-0000-0000-0000-{n:012d}", run=1, priority=priority,
                               queued_at=datetime(2026, 12, 7, tzinfo=UTC) + timedelta(seconds=n),
                               batch_index=None, application=application)  # fmt: skip

    first = [run(0), run(1), run(2)]
    assert fairness.acquire_many(first, keys=[key] * 3) == [True, True, False]
    # Again, with two new ones: 0 and 1 keep their slots, 2 its place, the new ones line up.
    again = [run(0), run(3), run(1), run(2), run(4, "high")]
    assert fairness.acquire_many(again, keys=[key] * 5) == [True, False, True, False, False]
    line = [job.decode() for job in redis_client().zrange(key.line, 0, -1)]
    assert line == [task_job_id(run(n).id, 1) for n in (4, 2, 3)]  # high first, then oldest
    assert sorted(fairness.slot_holders(redis_client(), key)) == sorted(
        task_job_id(run(n).id, 1) for n in (0, 1)
    )
    clean_redis()
