"""Operations endpoints: liveness, readiness and Prometheus metrics (README: Operations)."""

from __future__ import annotations

import hmac
import threading
import time

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tasks.plumbing.queueing import redis_client
from tasks.telemetry.metrics import TaskhookCollector


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except DatabaseError as exc:
        checks["database"] = f"error: {type(exc).__name__}: {exc}"[:300]
    try:
        redis_client().ping()
        checks["redis"] = "ok"
    except (redis.RedisError, OSError) as exc:
        checks["redis"] = f"error: {type(exc).__name__}: {exc}"[:300]
    failing = [name for name, result in checks.items() if result != "ok"]
    body = {"status": "ok" if not failing else "unavailable", "checks": checks, "failing": failing}
    return JsonResponse(body, status=503 if failing else 200)


_registry = CollectorRegistry(auto_describe=False)
_registry.register(TaskhookCollector())


_scrape_lock = threading.Lock()
_last_scrape: tuple[float, bytes] = (float("-inf"), b"")


def _scrape() -> bytes:
    """The figures, computed at most once per METRICS_CACHE_SECONDS per process (several
    Prometheus servers, or a fast scrape interval, then cost one count of the task table)."""
    global _last_scrape
    with _scrape_lock:
        taken_at, body = _last_scrape
        if time.monotonic() - taken_at >= settings.METRICS_CACHE_SECONDS:
            body = generate_latest(_registry)
            _last_scrape = (time.monotonic(), body)
        return body


def _unauthorized(message: str) -> JsonResponse:
    return JsonResponse(
        {"error": {"code": "unauthorized", "message": message, "field": None}}, status=401
    )


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format, behind `Authorization: Bearer $METRICS_TOKEN`. Without a token it
    is open only with DEBUG on or METRICS_PUBLIC=true: queue depths and application names are
    not for the internet."""
    token = settings.METRICS_TOKEN
    if token:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), token.encode()):
            return _unauthorized("Bearer token required.")
    elif not (settings.DEBUG or settings.METRICS_PUBLIC):
        return _unauthorized("Set METRICS_TOKEN (or METRICS_PUBLIC=true) to serve metrics.")
    return HttpResponse(_scrape(), content_type=CONTENT_TYPE_LATEST)
