"""Batches (issue #20, "Fast, without starving anyone"): how fast a batch is ingested, and what
another client sees while a big one is. `make bench` runs this from bench/run.py; `python
bench/batches.py` runs it alone. Writes the "Batches" section of docs/benchmarks.md and every
figure to var/bench-batches.json.

Phases, on one gunicorn as `make run` serves it (bench.common.start_gunicorn):

- ingest: no worker running. A batch of INGEST_ITEMS items (JSON, one POST, timed from the
  request sent to the response received: every item stored and enqueued), to an application
  without a per-key cap (the batch's own, BATCH_CONCURRENCY, queues that many items, the
  rest wait in the batch's line) and to one with max_concurrency_per_key = FAIR_CAP,
  against single async submits through the API (wrk, WRK_CLIENTS clients, WRK_SECONDS s),
  in rounds single, batch, batch with the cap, single, ..., each batch's rate over the mean
  of the single rates right before and after it (the machine's speed drifts within minutes).
- fairness: an application on the `sleep` runner with max_concurrency_per_key = FAIR_CAP,
  FAIR_WORKERS task workers. Client B submits sequentially on one keep-alive connection, one
  every B_INTERVAL s (no user, 0 s tasks: they never queue behind each other): its latency and
  its tasks' wait (started_at - created_at). First alone (B_SUBMITS submits); then from the
  moment a BIG_ITEMS-item batch of ITEM_SECONDS tasks is sent until it is answered; then,
  once all those tasks of B have started, B_SUBMITS more while the workers run the batch's
  items. The batch goes as
  one NDJSON body when the API takes `application/x-ndjson`, else as JSON batches of 10,000
  items one after another whose items all name one concurrency_key. Either way its items wait
  as one key, so they hold at most FAIR_CAP workers and B's tasks take the others.

Backends: SQLite + an embedded Redis always; PostgreSQL + Redis when DATABASE_URL (or
BENCH_PG_URL) is a PostgreSQL URL: database `taskhook_bench_batches` on that server
(recreated, dropped at the end) and Redis db BENCH_REDIS_DB (default 13, as bench/run.py) of
REDIS_URL's server, or BENCH_BATCHES_REDIS_URL; flushed before and after, so it must be the
benchmark's own (skipped when live RQ workers of something else are registered there).
  python bench/batches.py            # orchestrate, write the section of docs/benchmarks.md
  python bench/batches.py --child    # one backend (env says which), JSON on stdout
  python bench/batches.py --report   # the section again from var/bench-batches.json
BENCH_BATCHES_ONLY=sqlite|postgresql picks one backend; BENCH_BATCHES_PHASES=ingest runs a
subset (figures printed, no report); BENCH_BATCHES_FORM=json|ndjson sends the big batch in that
form (default: NDJSON when the API takes it). Sizes: BENCH_BATCHES_ITEMS, _ROUNDS, _BIG, _B_SUBMITS,
_WRK_SECONDS.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from math import nan
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench import common  # noqa: E402
from bench.common import write_report_section  # noqa: E402
from bench.run import percentile, wait_until  # noqa: E402
from bench.scheduling import Stack, reset_queues, run_child  # noqa: E402

INGEST_ITEMS = int(os.environ.get("BENCH_BATCHES_ITEMS", 10_000))
ROUNDS = int(os.environ.get("BENCH_BATCHES_ROUNDS", 3))
WRK_SECONDS = int(os.environ.get("BENCH_BATCHES_WRK_SECONDS", 4))
WRK_CLIENTS = 10
BIG_ITEMS = int(os.environ.get("BENCH_BATCHES_BIG", 100_000))
JSON_ITEMS = 10_000  # the JSON form's limit (tasks.batches.ingest.MAX_ITEMS)
BIG_BATCH_KEY = "bench-big-batch"  # the JSON batches' items' one key
B_SUBMITS = int(os.environ.get("BENCH_BATCHES_B_SUBMITS", 300))
B_INTERVAL = 0.02  # between the starts of B's submits: below what the free worker drains
B_WARMUP = 10
FAIR_WORKERS = 2
FAIR_CAP = 1
ITEM_SECONDS = 0.1
FAIR_BOUND_SECONDS = 1.0  # the scheduling issue's: another user's task starts within 1 s
LATENCY_TARGET_MS = 50.0
INGEST_TARGET = 10_000.0  # tasks/s
RATIO_TARGET = 10.0
PHASES = ("ingest", "fairness")
RESULTS = BASE_DIR / "var" / "bench-batches.json"
WORKER_LOG = BASE_DIR / "var" / "bench-batches-workers.log"
PG_DATABASE = "taskhook_bench_batches"


# --- applications and requests (the stack: bench.scheduling.Stack) --------------------------------


def new_application(runner: str, **settings: Any) -> tuple[Any, str]:
    from tasks.applications import create_application

    created = create_application(name=f"bench-batches-{uuid.uuid4().hex[:12]}", runner=runner,
                                 retry_schedule=[], rate_limit_per_second=0, auto_retry=False,
                                 **settings)  # fmt: skip
    return created.application, created.api_key


def post(
    stack: Stack, path: str, body: bytes, api_key: str, content_type: str = "application/json"
) -> tuple[float, int, dict[str, Any]]:
    """One POST on a new connection: seconds from the request sent to the whole answer read,
    the status and the decoded answer."""
    client = stack.connection()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": content_type}
    try:
        began = time.perf_counter()
        client.request("POST", path, body=body, headers=headers)
        response = client.getresponse()
        answer = response.read()
        seconds = time.perf_counter() - began
    finally:
        client.close()
    return seconds, response.status, json.loads(answer) if answer else {}


def wrk_submits(stack: Stack, application, api_key: str) -> float:
    """Single async submits/s through the API (2xx answers only)."""
    url = f"http://127.0.0.1:{stack.port}/api/applications/{application.id}/generate"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    body = json.dumps({"inputs": {"q": 1}, "response_mode": "async"})
    return common.wrk(url, headers, method="POST", body=body, clients=WRK_CLIENTS,
                      seconds=WRK_SECONDS)  # fmt: skip


def lane_jobs() -> int:
    from tasks.plumbing.queueing import queue
    from tasks.scheduling import lanes

    return sum(queue(name).count for name in lanes.lane_names())


# --- 1. ingestion ---------------------------------------------------------------------------------


def phase_ingest(stack: Stack) -> dict[str, Any]:
    """Rounds of: single submits, then a batch to an application without a per-key cap (the
    batch is one key of BATCH_CONCURRENCY) and one to an application with
    max_concurrency_per_key = FAIR_CAP; and single submits once more at the end. The items
    past the cap wait in the batch's line, without an RQ job."""
    from django.conf import settings

    from tasks.models import Task

    plain, plain_key = new_application("echo")
    capped, capped_key = new_application("echo", max_concurrency_per_key=FAIR_CAP)
    body = json.dumps({"items": [{"inputs": {"q": index}} for index in range(INGEST_ITEMS)]})
    singles = [wrk_submits(stack, plain, plain_key)]
    batches: dict[str, list[dict[str, Any]]] = {"uncapped": [], "capped": []}
    for _ in range(ROUNDS):
        for kind, (application, api_key) in (("uncapped", (plain, plain_key)),
                                             ("capped", (capped, capped_key))):  # fmt: skip
            time.sleep(1.0)  # the web finishes the requests wrk left in flight
            reset_queues()
            path = f"/api/applications/{application.id}/batches"
            seconds, status, answer = post(stack, path, body.encode(), api_key)
            assert status == 200, (status, answer)
            # Every item stored and enqueued (or lined) when the answer came; checked untimed.
            stored = Task.objects.filter(batch_id=answer["batch_id"]).count()
            queued = lane_jobs()
            cap = settings.BATCH_CONCURRENCY if kind == "uncapped" else FAIR_CAP
            expected = min(INGEST_ITEMS, cap)
            assert (stored, queued) == (INGEST_ITEMS, expected), (stored, queued)
            batches[kind].append({"seconds": seconds, "tasks_per_s": INGEST_ITEMS / seconds})
            print(f"ingest: batch {kind} {batches[kind][-1]}", file=sys.stderr, flush=True)
        reset_queues()
        singles.append(wrk_submits(stack, plain, plain_key))
        print(f"ingest: single {singles[-1]:.0f}/s", file=sys.stderr, flush=True)
    time.sleep(1.0)
    reset_queues()
    result: dict[str, Any] = {
        "items": INGEST_ITEMS,
        "single_rounds": singles,
        "single_per_s": statistics.median(singles),
        "single_range": [min(singles), max(singles)],
    }
    for kind, rounds in batches.items():
        rates = [r["tasks_per_s"] for r in rounds]
        # Each round over the mean of the single rates right before and after it.
        ratios = [rate / statistics.fmean(singles[i : i + 2]) for i, rate in enumerate(rates)]
        result[kind] = {"rounds": rounds, "per_s": statistics.median(rates),
                        "range": [min(rates), max(rates)], "ratio": statistics.median(ratios),
                        "ratios": ratios}  # fmt: skip
    return result


# --- 2. fairness under a big batch ----------------------------------------------------------------


def ndjson_accepted(stack: Stack, application, api_key: str) -> bool:
    """Whether the API takes an NDJSON batch (a one-item probe, cleared before the phase), unless
    BENCH_BATCHES_FORM says json or ndjson."""
    form = os.environ.get("BENCH_BATCHES_FORM", "auto")
    if form != "auto":
        return form == "ndjson"
    path = f"/api/applications/{application.id}/batches"
    _, status, answer = post(stack, path, b'{"inputs": {"seconds": 0}}\n', api_key,
                             "application/x-ndjson")  # fmt: skip
    reset_queues()
    if status != 200:
        print(f"NDJSON batch refused ({status} {answer}): JSON batches of {JSON_ITEMS:,} instead",
              file=sys.stderr, flush=True)  # fmt: skip
    return status == 200


def big_batch_bodies(ndjson: bool) -> list[tuple[bytes, str]]:
    """The big batch: one NDJSON body, or JSON bodies of JSON_ITEMS whose items all name one
    concurrency_key, so that they wait as one key as a single batch's items would."""
    if ndjson:
        item = json.dumps({"inputs": {"seconds": ITEM_SECONDS}})
        return [(("\n".join([item] * BIG_ITEMS) + "\n").encode(), "application/x-ndjson")]
    item = json.dumps({"inputs": {"seconds": ITEM_SECONDS}, "concurrency_key": BIG_BATCH_KEY})
    bodies = []
    for start in range(0, BIG_ITEMS, JSON_ITEMS):
        count = min(JSON_ITEMS, BIG_ITEMS - start)
        bodies.append((f'{{"items": [{", ".join([item] * count)}]}}'.encode(), "application/json"))
    return bodies


def client_b(stack: Stack, application, api_key: str, samples: list[dict[str, Any]], *,
             in_flight: threading.Event | None = None) -> None:  # fmt: skip
    """Sequential async submits on one keep-alive connection, one every B_INTERVAL s: while
    `in_flight` is set (each sample "during" if it was set all along it), else B_SUBMITS of
    them ("after"). Each sample: latency, status, when."""
    client = stack.connection()
    path = f"/api/applications/{application.id}/generate"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    body = json.dumps({"inputs": {"seconds": 0}, "response_mode": "async"})
    try:
        for _ in range(B_WARMUP):  # the connection and the web's first requests
            client.request("POST", path, body=body, headers=headers)
            client.getresponse().read()
        next_at = time.perf_counter()
        while in_flight.is_set() if in_flight else len(samples) < B_SUBMITS:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += B_INTERVAL
            began = time.perf_counter()
            client.request("POST", path, body=body, headers=headers)
            response = client.getresponse()
            raw = response.read()
            took = (time.perf_counter() - began) * 1000
            answer = json.loads(raw) if raw.startswith(b"{") else {}
            phase = "after" if in_flight is None else "during" if in_flight.is_set() else ""
            samples.append({"ms": took, "task_id": answer.get("task_id"),
                            "status": response.status, "at": began, "phase": phase})  # fmt: skip
            next_at = max(next_at, time.perf_counter())  # a slow answer: no burst after it
    finally:
        client.close()


def b_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency and wait percentiles of B's submits while the batch was in flight and after its
    answer, once each of B's tasks has started."""
    from tasks.models import Task

    ids = [sample["task_id"] for sample in samples if sample["status"] == 200]
    wait_until(lambda: not Task.objects.filter(pk__in=ids, started_at__isnull=True).exists(),
               timeout=300, interval=0.1)  # fmt: skip
    waits = {str(pk): (started - created).total_seconds() * 1000
             for pk, created, started in Task.objects.filter(pk__in=ids)
             .values_list("pk", "created_at", "started_at")}  # fmt: skip

    def summary(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        if not chosen:
            return {"count": 0}
        latencies = [sample["ms"] for sample in chosen]
        chosen_waits = [waits[s["task_id"]] for s in chosen if s["status"] == 200] or [nan]
        return {
            "count": len(chosen),
            "refused": sum(sample["status"] != 200 for sample in chosen),
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p99_ms": percentile(latencies, 99),
            "latency_max_ms": max(latencies),
            "wait_p50_ms": percentile(chosen_waits, 50),
            "wait_p99_ms": percentile(chosen_waits, 99),
            "wait_max_ms": max(chosen_waits),
            # When the slow answers and the late starts came (s after the first submit; ms).
            "slow": [[round(s["at"] - chosen[0]["at"], 2), round(s["ms"])] for s in chosen
                     if s["ms"] > LATENCY_TARGET_MS],
            "late": [[round(s["at"] - chosen[0]["at"], 2), round(waits[s["task_id"]])]
                     for s in chosen if s["status"] == 200
                     and waits[s["task_id"]] > FAIR_BOUND_SECONDS * 1000 / 4],
        }  # fmt: skip

    return {phase: summary([s for s in samples if s["phase"] == phase])
            for phase in ("during", "after")}  # fmt: skip


def phase_fairness(stack: Stack) -> dict[str, Any]:
    from tasks.models import Task

    application, api_key = new_application("sleep", max_concurrency_per_key=FAIR_CAP)
    ndjson = ndjson_accepted(stack, application, api_key)
    Task.objects.filter(application=application).delete()
    bodies = big_batch_bodies(ndjson)
    path = f"/api/applications/{application.id}/batches"
    stack.start_workers(FAIR_WORKERS)
    alone: list[dict[str, Any]] = []
    client_b(stack, application, api_key, alone)
    result: dict[str, Any] = {"ndjson": ndjson, "requests": len(bodies), "alone": b_figures(alone)}
    print(f"fairness: B alone {result['alone']}", file=sys.stderr, flush=True)

    # B while the batch is sent, until its answer.
    in_flight = threading.Event()
    in_flight.set()
    samples: list[dict[str, Any]] = []
    b = threading.Thread(target=client_b, args=(stack, application, api_key, samples),
                         kwargs={"in_flight": in_flight})  # fmt: skip
    began = time.perf_counter()
    b.start()
    batch_ids, statuses = [], []
    try:
        for body, content_type in bodies:
            _, status, answer = post(stack, path, body, api_key, content_type)
            statuses.append(status)
            batch_ids.append(answer.get("batch_id"))
    finally:
        ingest_seconds = time.perf_counter() - began
        in_flight.clear()
        b.join()
    during = b_figures(samples)  # once all of B's tasks of that time have started
    # Then B_SUBMITS more, while the workers run the batch's items.
    after: list[dict[str, Any]] = []
    client_b(stack, application, api_key, after)
    assert statuses == [200] * len(bodies), statuses
    stored = Task.objects.filter(batch_id__in=batch_ids).count()
    assert stored == BIG_ITEMS, stored
    result |= {
        "items": BIG_ITEMS,
        "ingest_seconds": ingest_seconds,
        "ingest_per_s": BIG_ITEMS / ingest_seconds,
        "under_batch": {"during": during["during"], "after": b_figures(after)["after"]},
    }
    stack.stop_workers()
    # What the batch held meanwhile: its items started, and the most running at once.
    runs = Task.objects.filter(batch_id__in=batch_ids, started_at__isnull=False)
    moments = sorted(
        (moment, step)
        for started, finished in runs.values_list("started_at", "finished_at")
        for moment, step in ((started, 1), (finished or datetime.max.replace(tzinfo=UTC), -1))
    )
    running = [0]
    for _, step in moments:
        running.append(running[-1] + step)
    result |= {"batch_items_started": runs.count(), "batch_most_running": max(running)}
    return result


# --- the child: one backend -----------------------------------------------------------------------


def child() -> None:
    run_child("BENCH_BATCHES_PHASES", {name: globals()[f"phase_{name}"] for name in PHASES},
              name="batches", worker_log=WORKER_LOG, timeout=600)  # fmt: skip


# --- orchestration --------------------------------------------------------------------------------


def backends(embedded_url: str, sqlite: Path) -> list[tuple[str, dict[str, str]]]:
    return common.backends(
        embedded_url, sqlite, base=common.base_env(),
        only=os.environ.get("BENCH_BATCHES_ONLY", ""), pg_database=PG_DATABASE,
        redis_url=bench_redis_url(), in_use_hint="BENCH_REDIS_DB or BENCH_BATCHES_REDIS_URL",
    )  # fmt: skip


def bench_redis_url() -> str:
    db = int(os.environ.get("BENCH_REDIS_DB", 13))
    return common.bench_redis_url("BENCH_BATCHES_REDIS_URL", db)


def main() -> None:
    WORKER_LOG.write_bytes(b"")
    common.orchestrate(
        str(Path(__file__).resolve()), "batches", backends, write_report=write_report,
        partial="BENCH_BATCHES_PHASES", results=RESULTS, pg_database=PG_DATABASE,
    )  # fmt: skip


# --- the report -----------------------------------------------------------------------------------


def _range(median: float, low: float, high: float, digits: int = 0) -> str:
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def _b(f: dict[str, Any]) -> str:
    """Client B's latency p50 / p99 and its tasks' waits p50 / p99 / max."""
    if not f["count"]:
        return "none"
    refused = f", **{f['refused']} refused**" if f.get("refused") else ""
    return (f"{f['latency_p50_ms']:.1f} / {f['latency_p99_ms']:.1f} / "
            f"{f['latency_max_ms']:.0f} ms; waits "
            f"{f['wait_p50_ms']:.0f} / {f['wait_p99_ms']:.0f} / {f['wait_max_ms']:.0f} ms "
            f"({f['count']} submits{refused})")  # fmt: skip


ROWS = [
    (
        f"**Ingestion**: a {INGEST_ITEMS:,}-item JSON batch, request sent to answer (tasks/s), "
        f"no per-key cap (the batch's own: BATCH_CONCURRENCY), median (range) of {ROUNDS} "
        f"(target >= {INGEST_TARGET:,.0f})",
        lambda d: _range(d["ingest"]["uncapped"]["per_s"], *d["ingest"]["uncapped"]["range"]),
    ),
    (
        f"  same, max_concurrency_per_key = {FAIR_CAP}",
        lambda d: _range(d["ingest"]["capped"]["per_s"], *d["ingest"]["capped"]["range"]),
    ),
    (
        f"  single async submits through the API, {WRK_CLIENTS} clients (tasks/s), median "
        f"(range) of {ROUNDS + 1}",
        lambda d: _range(d["ingest"]["single_per_s"], *d["ingest"]["single_range"]),
    ),
    (
        f"  ratio batch / single, median (range) of the rounds (target >= {RATIO_TARGET:.0f}): "
        "no cap; cap",
        lambda d: "; ".join(
            _range(d["ingest"][kind]["ratio"], *_span(d["ingest"][kind]["ratios"]), 1)
            for kind in ("uncapped", "capped")
        ),
    ),
    (
        f"**Under a big batch**: {BIG_ITEMS:,} items of {ITEM_SECONDS * 1000:.0f} ms sent as "
        "(form, requests); ingested in, tasks/s",
        lambda d: (
            f"{'NDJSON' if d['fairness']['ndjson'] else 'JSON'}, {d['fairness']['requests']}; "
            f"{d['fairness']['ingest_seconds']:.1f} s, {d['fairness']['ingest_per_s']:,.0f}/s"
        ),
    ),
    (
        "  client B's async submits while the batch request was in flight: latency p50 / p99 "
        f"/ max (target p99 <= {LATENCY_TARGET_MS:.0f} ms); its tasks' wait p50 / p99 / max",
        lambda d: _b(d["fairness"]["under_batch"]["during"]),
    ),
    (
        f"  B's next {B_SUBMITS} submits, after the answer (and B's earlier tasks started), the "
        f"workers running the batch's items: the same (its tasks' wait: bound < "
        f"{FAIR_BOUND_SECONDS:.0f} s)",
        lambda d: _b(d["fairness"]["under_batch"]["after"]),
    ),
    (
        f"  contrast: B alone ({B_SUBMITS} submits, the same {FAIR_WORKERS} workers, no batch)",
        lambda d: _b(d["fairness"]["alone"]["after"]),
    ),
    (
        f"  batch items started by the end of B's submits; the most running at once "
        f"({FAIR_WORKERS} workers, max_concurrency_per_key {FAIR_CAP})",
        lambda d: (
            f"{d['fairness']['batch_items_started']:,}; "
            f"{d['fairness'].get('batch_most_running', '?')}"
        ),
    ),
    (
        "Load average (1 min) before / after; run time",
        lambda d: f"{d['load_before']:.1f} / {d['load_after']:.1f}; {d['seconds'] / 60:.1f} min",
    ),
]


def verdicts(columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The issue's targets, met or missed, with the figure of each column. A ratio or rate is
    met when every round's is, missed when none is, else inconclusive (the rounds straddle it)."""
    said_as = {True: "met", False: "**missed**", None: "inconclusive (the rounds straddle it)"}

    def line(target: str, met: Any, figure: Any) -> str:
        said = "; ".join(f"{name}: {said_as[met(d)]}, {figure(d)}" for name, d in columns)
        return f"- {target}: {said}."

    def rounds(values: list[float], target: float) -> bool | None:
        return True if min(values) >= target else False if max(values) < target else None

    def during(d: dict[str, Any]) -> dict[str, Any]:
        return d["fairness"]["under_batch"]["during"]

    def after(d: dict[str, Any]) -> dict[str, Any]:
        return d["fairness"]["under_batch"]["after"]

    return [
        line(f"a {INGEST_ITEMS:,}-item batch ingests at >= {INGEST_TARGET:,.0f} tasks/s (no cap; "
             "cap)",
             lambda d: rounds([r["tasks_per_s"] for kind in ("uncapped", "capped")
                               for r in d["ingest"][kind]["rounds"]], INGEST_TARGET),
             lambda d: " and ".join(f"{d['ingest'][kind]['per_s']:,.0f}/s"
                                    for kind in ("uncapped", "capped"))),
        line(f">= {RATIO_TARGET:.0f}x the single submit",
             lambda d: rounds([*d["ingest"]["uncapped"]["ratios"],
                               *d["ingest"]["capped"]["ratios"]], RATIO_TARGET),
             lambda d: " and ".join(f"x{d['ingest'][kind]['ratio']:.1f}"
                                    for kind in ("uncapped", "capped"))),
        line(f"another client's submit p99 <= {LATENCY_TARGET_MS:.0f} ms while a "
             f"{BIG_ITEMS:,}-item batch is ingested",
             lambda d: during(d)["count"] > 0 and not during(d)["refused"]
             and during(d)["latency_p99_ms"] <= LATENCY_TARGET_MS,
             lambda d: f"{during(d).get('latency_p99_ms', nan):.1f} ms"),
        line(f"its tasks start within {FAIR_BOUND_SECONDS:.0f} s (the scheduling issue's bound "
             "for another user's task) while the batch's items run",
             lambda d: after(d)["wait_max_ms"] < FAIR_BOUND_SECONDS * 1000,
             lambda d: f"longest wait {after(d)['wait_max_ms']:.0f} ms (during the ingestion: "
                       f"{during(d).get('wait_max_ms', nan):.0f} ms)"),
    ]  # fmt: skip


DIAGNOSIS = """Diagnosis (this session, 2026-12-08; the fairness phase alone on SQLite for the A/B
pairs, run one after another in the same half hour):

- Five full runs. Before the pause below (03:37 UTC): a 10,000-item batch 18,264 tasks/s on
  SQLite, x22.6 its single submits (809/s), B's p99 under the 100,000-item batch 95.2 ms. With
  it (03:58, 04:01, 04:04, 04:09; the table above is the last): 15,031, 7,747, 9,470 and
  13,804/s, x25.0 to x28.6 (singles 550, 299, 324 and 525/s: the host's speed moved that much
  within minutes, the ratio held), B's p99 45.1, 44.7, 58.9 and 50.0 ms. The 58.9 run's B
  alone (no batch) had p99 34.4 ms, against 12.3 in the last. Last session's code gave
  8,714/s and 73.6 ms on a slow hour.
- SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20 ms... between tries of a locked BEGIN, so a
  submit behind a batch's chunk waited for the next try, not for the chunk. The SQLite backend
  (dashboard/runtime/sqlite3) now retries BEGIN IMMEDIATE every 0.5 ms: B's p99 92.7 and 86.4
  ms with Django's backend against 70.1 and 68.2 ms with it. After it, 2 of the phase's write
  transactions waited over 2 ms for the lock (3.0 ms at most): the lock was no longer B's wait.
- B's connection and the batch's landed in the same web process in some runs (271 of 271
  submits) and not in others (0 of 277): p99 70-87 ms either way, so not only the GIL.
- A pause after each chunk's commit: 1 ms gave p99 65.0 and 68.0 ms, 2 ms 42.6, 46.2 and 35.3
  ms (kept: SQLITE_CHUNK_PAUSE_SECONDS). It costs the 100,000 items 6.5-6.7 s -> 8.0-9.0 s
  and a 10,000-item batch 80 ms, the rates above.
- Tried and not kept: a PASSIVE WAL checkpoint after every chunk (p99 47.0 and 56.8 ms, but the
  100,000 items in 10.3-10.8 s), or after every 2,000 items (58.1 and 65.2 ms against 59.5
  and 67.0 without: nothing).
- The items are enqueued 2,000 at a time on SQLite too (they were enqueued per chunk of 250):
  in-process, the enqueues were 140 ms of a 600 ms submit of 10,000 items; its gain was not
  measured apart from the lock change.
- Giving the batch's thread a lower CPU priority (nice 10) bought nothing: p99 42.6 and 46.6
  ms against 42.4 and 34.3 without.
- PostgreSQL's path did not change. Its B p99 was 22.7, 72.0, 37.9, 30.2 and 36.9 ms in the
  five runs; in the 72.0 run, B alone (no batch) had p99 44.0 ms against 8.7 in the first."""


def write_report(columns: list[tuple[str, dict[str, Any]]], seconds: float) -> None:
    machine = common.machine()
    section = (
        "## Batches\n\n"
        f"`bench/batches.py` (run by `make bench`), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"code at {' / '.join(dict.fromkeys(d.get('revision', '?') for _, d in columns))} "
        f"({machine}; {seconds / 60:.0f} min in all). Each column is one run on a fresh "
        "database; gunicorn as `make run` serves it. Ingestion: no worker running; the "
        "batch's time is from the request sent to the answer read (every item stored, on "
        "PostgreSQL by a binary COPY per 10,000 items (one transaction) written 2,000 at a "
        "time, on SQLite by an INSERT run for 250 rows, a transaction each and a 2 ms pause "
        "after it, the items with time-ordered ids, "
        "and enqueued: a batch is one key, so BATCH_CONCURRENCY (default 8) of its items, or "
        "the application's max_concurrency_per_key, get an RQ job, the rest wait in its line); "
        "the single submits are wrk's 2xx answers/s over "
        f"{WRK_SECONDS} s; rounds single, batch, batch with the cap, single, ..., each batch "
        "over the mean of the single rates right before and after it. Under a big batch: the "
        f"`sleep` runner, max_concurrency_per_key = {FAIR_CAP}, {FAIR_WORKERS} task workers; "
        "client B submits sequentially on one keep-alive connection, one every "
        f"{B_INTERVAL * 1000:.0f} ms (no user, tasks of 0 s: alone, they never queue behind "
        "each other), from the moment the batch is sent until it is answered, then, once all "
        f"those tasks of B had started, {B_SUBMITS} times more; waits are started_at - "
        "created_at in the database. The batch's items wait as one key (`batch:<id>`; sent "
        "as JSON batches, their one "
        f"concurrency_key), so they hold at most {FAIR_CAP} of the workers.\n\n"
        + common.report_table(ROWS, columns)
        + "\n\nTargets (the issue's words):\n\n"
        + "\n".join(verdicts(columns))
        + ("\n\n" + DIAGNOSIS if DIAGNOSIS else "")
        + "\n"
    )
    write_report_section("Batches", section)
    print(section)


if __name__ == "__main__":
    common.command_line(child=child, main=main, write_report=write_report, results=RESULTS)
