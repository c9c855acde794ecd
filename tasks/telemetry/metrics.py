"""Prometheus metrics, derived at scrape time from the database and Redis.

Nothing lives in one process's memory for long, so the numbers are right with any number of web
processes and with workers on other machines: events are counted in Redis hashes (HINCRBY, atomic
across processes; a worker batches its increments for up to a second, see
tasks.telemetry.counters), states are read from the database and Redis when scraped.

- taskhook_tasks_total{app,status}        tasks stored now, by application and status (gauge;
                                           finished tasks leave it when retention removes them)
- taskhook_queue_depth{queue}             jobs waiting on each RQ queue
- taskhook_callback_attempts_total{app,outcome}   delivery attempts, outcome delivered|failed
- taskhook_task_duration_seconds{app}     histogram of run time of finished runs
- taskhook_workers                        registered RQ workers
- taskhook_reconciler_corrections_total{kind}
- taskhook_cleanup_removed_total          tasks removed by retention
- taskhook_endpoint_*{app,endpoint}       each endpoint's health (tasks.delivery.health):
                                           consecutive_failures, circuit_open, disabled,
                                           success_ratio and latency_ms{quantile} over its last
                                           attempts
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict

from django.conf import settings
from django.db.models import Count
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from rq import Queue
from rq.worker import BaseWorker

from tasks.delivery import health
from tasks.models import Application, Task
from tasks.plumbing.lane_names import task_lanes
from tasks.plumbing.queueing import redis_client
from tasks.telemetry import counters

CALLBACK_KEY = "taskhook:metrics:callback_attempts"
DURATION_KEY = "taskhook:metrics:task_duration"
CLEANUP_KEY = "taskhook:metrics:cleanup_removed"
RECONCILER_KEY = "taskhook:reconciler:corrections"
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)


def _bucket_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def record_callback_attempt(*, application_id: uuid.UUID | str, delivered: bool) -> None:
    outcome = "delivered" if delivered else "failed"
    counters.add(CALLBACK_KEY, field=f"{application_id}|{outcome}")


def observe_task_duration(*, application_id: uuid.UUID | str, seconds: float) -> None:
    """Add one run time to the histogram."""
    bound = next(b for b in BUCKETS if seconds <= b)
    counters.add(DURATION_KEY, field=f"{application_id}|{_bucket_label(bound)}")
    counters.add(DURATION_KEY, float(seconds), field=f"{application_id}|sum")


def record_cleanup(removed: int) -> None:
    if removed:
        counters.add(CLEANUP_KEY, removed)


def record_reconciler_corrections(counts: dict[str, int]) -> None:
    for kind, count in counts.items():
        if count:
            counters.add(RECONCILER_KEY, count, field=kind)


def _decode(raw: dict) -> dict[str, str]:
    return {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in raw.items()}  # fmt: skip


class TaskhookCollector(Collector):
    def collect(self):
        names = {str(pk): name for pk, name in Application.objects.values_list("pk", "name")}

        def app_label(app_id: str) -> str:
            return names.get(app_id, app_id)

        tasks = GaugeMetricFamily(
            "taskhook_tasks_total", "Tasks stored, by application and status.",
            labels=["app", "status"],
        )  # fmt: skip
        rows = (
            Task.objects.order_by().values_list("application_id", "status").annotate(n=Count("pk"))
        )
        for app_id, status, count in rows:
            tasks.add_metric([app_label(str(app_id)), status], count)
        yield tasks

        client = redis_client()
        depth = GaugeMetricFamily(
            "taskhook_queue_depth", "Jobs waiting on each RQ queue.", labels=["queue"]
        )
        queues = (*task_lanes(settings.TASK_QUEUE), settings.CALLBACK_QUEUE,
                  settings.MAINTENANCE_QUEUE)  # fmt: skip
        for name in queues:
            depth.add_metric([name], client.llen(Queue(name, connection=client).key))
        yield depth

        yield GaugeMetricFamily(
            "taskhook_workers", "Registered RQ workers.", value=len(BaseWorker.all(client))
        )

        attempts = CounterMetricFamily(
            "taskhook_callback_attempts", "Callback delivery attempts.", labels=["app", "outcome"]
        )
        for field, value in _decode(client.hgetall(CALLBACK_KEY)).items():
            app_id, outcome = field.rsplit("|", 1)
            attempts.add_metric([app_label(app_id), outcome], int(value))
        yield attempts

        yield self._durations(_decode(client.hgetall(DURATION_KEY)), app_label)

        corrections = CounterMetricFamily(
            "taskhook_reconciler_corrections", "Corrections made by the reconciler.",
            labels=["kind"],
        )  # fmt: skip
        for kind, value in _decode(client.hgetall(RECONCILER_KEY)).items():
            corrections.add_metric([kind], int(value))
        yield corrections

        yield CounterMetricFamily(
            "taskhook_cleanup_removed", "Tasks removed by retention cleanup.",
            value=int(client.get(CLEANUP_KEY) or 0),
        )  # fmt: skip

        yield from self._endpoints(app_label)
        yield from self._destinations(app_label)

    @staticmethod
    def _endpoints(app_label):
        rows = [(found, found.endpoint, [app_label(str(found.endpoint.application_id)),
                                         found.endpoint.origin])
                for found in health.all_health()]  # fmt: skip
        return _target_metrics("endpoint", ["app", "endpoint"], rows, attempts="attempts",
                               each="each endpoint", its="the endpoint's")  # fmt: skip

    @staticmethod
    def _destinations(app_label):
        """The endpoint figures, per destination (labelled by its masked URL and kind)."""
        rows = [(found, found.destination, [app_label(str(found.destination.application_id)),
                                            found.destination.masked_url, found.destination.kind])
                for found in health.all_destination_health()]  # fmt: skip
        return _target_metrics("destination", ["app", "destination", "kind"], rows,
                               attempts="publishes", each="each destination",
                               its="the destination's")  # fmt: skip

    @staticmethod
    def _durations(raw: dict[str, str], app_label) -> HistogramMetricFamily:
        histogram = HistogramMetricFamily(
            "taskhook_task_duration_seconds", "Run time of finished task runs.", labels=["app"]
        )
        per_app: dict[str, dict[str, float]] = defaultdict(dict)
        for field, value in raw.items():
            app_id, key = field.rsplit("|", 1)
            per_app[app_id][key] = float(value)
        for app_id, values in sorted(per_app.items()):
            cumulative, buckets = 0.0, []
            for bound in BUCKETS:
                label = _bucket_label(bound)
                cumulative += values.get(label, 0.0)
                buckets.append((label, cumulative))
            histogram.add_metric([app_label(app_id)], buckets, values.get("sum", 0.0))
        return histogram


def _target_metrics(kind: str, labels: list[str], rows, *, attempts: str, each: str, its: str):
    """A delivery target's gauges (tasks.delivery.health): `rows` are (figures, row, label
    values) of endpoints or destinations."""
    gauges = {
        name: GaugeMetricFamily(f"taskhook_{kind}_{name}", text, labels=labels)
        for name, text in (
            ("consecutive_failures", f"Consecutive failed {attempts} to {each}."),
            ("circuit_open", f"1 while {its} circuit is open or half-open."),
            ("disabled", f"1 while the {kind} is disabled."),
            ("success_ratio", f"Delivered share of {its} last attempts."),
        )
    }
    latency = GaugeMetricFamily(
        f"taskhook_{kind}_latency_ms", f"Attempt duration percentiles over {its} last attempts.",
        labels=[*labels, "quantile"],
    )  # fmt: skip
    for found, row, key in rows:
        gauges["consecutive_failures"].add_metric(key, row.consecutive_failures)
        gauges["circuit_open"].add_metric(key, int(row.circuit != "closed"))
        gauges["disabled"].add_metric(key, int(row.disabled_at is not None))
        if found.success_rate is not None:
            gauges["success_ratio"].add_metric(key, found.success_rate)
        for quantile, value in (("0.5", found.p50_ms), ("0.95", found.p95_ms)):
            if value is not None:
                latency.add_metric([*key, quantile], value)
    return [*gauges.values(), latency]
