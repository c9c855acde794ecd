"""One worker draining queued work, beside raw RQ on the same Redis and database: the worker's
per-job cost without the web or a load generator competing for the 2 cores. For profiling:

    python bench/drain.py tasks 3000        # Taskhook task worker vs raw SimpleWorker
    python bench/drain.py callbacks 1000    # one callback worker, fast receiver on 127.0.0.1
    BENCH_PROFILE=1 python bench/drain.py tasks 3000   # also py-spy the Taskhook worker
    BENCH_PROFILE=cpu python bench/drain.py tasks 3000 # the same, CPU time only

Each prints jobs/s and the worker's CPU milliseconds per job.

DATABASE_URL / REDIS_URL choose the backends, as for the app.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("CALLBACK_ALLOW_PRIVATE_NETWORKS", "true")

from dashboard.runtime.processes import DELIVERY_WORKER_CLASS, TASK_WORKER_CLASS  # noqa: E402


def run_worker(queue_name: str, worker_class: str, profile: str | None = None) -> float:
    """Runs a burst worker; returns the CPU seconds it used (user + system)."""
    argv = [sys.executable, str(BASE_DIR / "manage.py"), "rqworker", queue_name, "--burst",
            "--worker-class", worker_class]  # fmt: skip
    if profile:
        # BENCH_PROFILE=cpu samples only running threads; otherwise waits count too (wall time).
        idle = [] if os.environ.get("BENCH_PROFILE") == "cpu" else ["--idle"]
        argv = ["py-spy", "record", *idle, "-r", "200", "-o", profile, "-f", "speedscope",
                "--", *argv]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, cwd=BASE_DIR, env=os.environ, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def raw(count: int) -> float:
    from rq import Queue
    from rq.job import Job

    from tasks.plumbing.queueing import redis_client

    queue = Queue("bench-raw", connection=redis_client())
    queue.empty()
    for _ in range(count):
        queue.enqueue("bench.noop.noop", result_ttl=60)
    subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "-u", os.environ["REDIS_URL"], "--burst", "-w",
         "rq.worker.SimpleWorker", "--logging_level", "WARNING", "bench-raw"],
        cwd=BASE_DIR, env=os.environ | {"PYTHONPATH": str(BASE_DIR)}, check=True,
    )  # fmt: skip
    jobs = [j for j in Job.fetch_many(queue.finished_job_registry.get_job_ids(),
                                      connection=redis_client()) if j]  # fmt: skip
    first, last = min(j.started_at for j in jobs), max(j.ended_at for j in jobs)
    for job in jobs:
        job.delete()
    return len(jobs) / (last - first).total_seconds()


# CPU seconds used by the last Taskhook worker run, by what it drained.
WORKER_CPU: dict[str, float] = {}


def tasks(count: int, application) -> float:
    from django.conf import settings
    from django.db.models import Max, Min

    from tasks.models import Task
    from tasks.submission import SubmitRequest, submit_task

    request = SubmitRequest(inputs={"q": "bench"}, response_mode="async", user="", callback_url="")
    for _ in range(count):
        submit_task(application=application, request=request)
    WORKER_CPU["tasks"] = run_worker(
        settings.TASK_QUEUE, TASK_WORKER_CLASS, os.environ.get("PROFILE_OUT")
    )
    rows = Task.objects.filter(application=application, status="succeeded")
    window = rows.aggregate(first=Min("started_at"), last=Max("finished_at"))
    assert rows.count() == count, rows.count()
    return count / (window["last"] - window["first"]).total_seconds()


def callbacks(count: int, application) -> float:
    from django.conf import settings

    from bench.common import queue_due_callbacks, start_receiver

    arrivals: list[float] = []
    server, hook = start_receiver(lambda body: arrivals.append(time.perf_counter()))
    queue_due_callbacks(application, hook, count)
    worker_class = os.environ.get("BENCH_CALLBACK_WORKER", DELIVERY_WORKER_CLASS)
    WORKER_CPU["callbacks"] = run_worker(
        settings.CALLBACK_QUEUE, worker_class, os.environ.get("PROFILE_OUT")
    )
    server.shutdown()
    assert len(arrivals) == count, len(arrivals)
    return (count - 1) / (arrivals[-1] - arrivals[0])


def main() -> None:
    import django

    django.setup()
    from django.core.management import call_command

    from tasks.applications import create_application

    what, count = sys.argv[1], int(sys.argv[2])
    call_command("migrate", verbosity=0)
    application = create_application(name=f"drain-{time.time_ns()}", runner="echo").application
    application.rate_limit_per_second = application.rate_limit_burst = 1_000_000
    application.retry_schedule = []
    application.save()
    if os.environ.get("BENCH_PROFILE"):
        os.environ["PROFILE_OUT"] = str(BASE_DIR / "var" / f"drain-{what}.speedscope.json")
    result = {"raw_simple_jobs_per_s": round(raw(count))}
    result[f"{what}_per_s"] = round(
        {"tasks": tasks, "callbacks": callbacks}[what](count, application)
    )
    result["ratio"] = round(result[f"{what}_per_s"] / result["raw_simple_jobs_per_s"], 2)
    # The worker's own CPU per job, its start-up (an empty burst) taken out: what a change to
    # the job path saves, whatever else the 2 cores are doing.
    from django.conf import settings

    drained = settings.TASK_QUEUE if what == "tasks" else settings.CALLBACK_QUEUE
    startup = run_worker(drained, TASK_WORKER_CLASS)
    result["worker_cpu_ms_per_job"] = round((WORKER_CPU[what] - startup) * 1000 / count, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
