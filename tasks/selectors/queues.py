"""Redis: queue lengths and registries, and the live workers (constant-time reads)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.utils import timezone
from rq import Queue
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker import BaseWorker

from tasks.plumbing.queueing import redis_client

# --- Redis: queues and workers -----------------------------------------------------------------


@dataclass
class QueueStats:
    name: str
    queued: int = 0
    started: int = 0
    scheduled: int = 0
    deferred: int = 0
    failed: int = 0


def queue_stats() -> list[QueueStats]:
    client = redis_client()
    stats = []
    for name in (settings.TASK_QUEUE, settings.CALLBACK_QUEUE, settings.MAINTENANCE_QUEUE):
        queue = Queue(name, connection=client)
        # ZCARD/LLEN only: constant time whatever the registry size.
        stats.append(
            QueueStats(
                name=name,
                queued=client.llen(queue.key),
                started=client.zcard(StartedJobRegistry(queue=queue).key),
                scheduled=client.zcard(ScheduledJobRegistry(queue=queue).key),
                deferred=client.zcard(DeferredJobRegistry(queue=queue).key),
                failed=client.zcard(FailedJobRegistry(queue=queue).key),
            )
        )
    return stats


@dataclass
class WorkerInfo:
    name: str
    state: str
    queues: list[str]
    current_job: str | None
    last_heartbeat: datetime | None
    alive: bool


def workers() -> list[WorkerInfo]:
    now = timezone.now()
    found = []
    for worker in BaseWorker.all(connection=redis_client()):
        heartbeat = worker.last_heartbeat
        if heartbeat is not None and timezone.is_naive(heartbeat):
            heartbeat = timezone.make_aware(heartbeat, UTC)
        found.append(
            WorkerInfo(
                name=worker.name,
                state=worker.get_state(),
                queues=worker.queue_names(),
                current_job=worker.get_current_job_id(),
                last_heartbeat=heartbeat,
                alive=heartbeat is not None and (now - heartbeat).total_seconds() < 120,
            )
        )
    return sorted(found, key=lambda w: w.name)
