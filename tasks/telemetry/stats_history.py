"""Short history for the dashboard's charts, kept in Redis and bounded.

- finished tasks per minute: an INCR per finished task (batched per worker,
  tasks.telemetry.counters) on a per-minute key that expires after 2 h; correct with any number
  of workers on any machines;
- queue depth: sampled every 10 s by a cron job into a list trimmed to the last hour.
"""

from __future__ import annotations

import json
import time

from django.conf import settings
from rq import Queue

from tasks.plumbing.lane_names import task_lanes
from tasks.plumbing.queueing import redis_client
from tasks.telemetry import counters

FINISHED_KEY = "taskhook:stats:finished:{minute}"
DEPTH_KEY = "taskhook:stats:depth"
DEPTH_SAMPLES = 360  # one hour at one sample per 10 s


def count_finished() -> None:
    """Count one finished task in this minute's bucket (batched in workers: telemetry.counters)."""
    counters.add(FINISHED_KEY.format(minute=int(time.time() // 60)), expire=7200)


def finished_per_minute(minutes: int = 60) -> list[tuple[int, int]]:
    """[(minute epoch seconds, finished count)] for the last `minutes` minutes, oldest first."""
    now_minute = int(time.time() // 60)
    minutes_list = list(range(now_minute - minutes + 1, now_minute + 1))
    values = redis_client().mget([FINISHED_KEY.format(minute=m) for m in minutes_list])
    return [(m * 60, int(v or 0)) for m, v in zip(minutes_list, values, strict=True)]


def sample_queue_depth() -> dict[str, int]:
    client = redis_client()
    # "tasks": every priority lane's runs (tasks.scheduling.lanes).
    lanes = task_lanes(settings.TASK_QUEUE)
    depths = {
        settings.TASK_QUEUE: sum(client.llen(Queue(name, connection=client).key) for name in lanes),
        settings.CALLBACK_QUEUE: client.llen(Queue(settings.CALLBACK_QUEUE, connection=client).key),
    }
    pipeline = client.pipeline(transaction=False)
    pipeline.lpush(DEPTH_KEY, json.dumps({"t": int(time.time()), **depths}))
    pipeline.ltrim(DEPTH_KEY, 0, DEPTH_SAMPLES - 1)
    pipeline.execute()
    return depths


def queue_depth_history() -> list[dict[str, int]]:
    """Samples of the last hour, oldest first."""
    raw = redis_client().lrange(DEPTH_KEY, 0, DEPTH_SAMPLES - 1)
    cutoff = time.time() - 3600
    samples = [json.loads(item) for item in reversed(raw)]
    return [s for s in samples if s.get("t", 0) >= cutoff]
