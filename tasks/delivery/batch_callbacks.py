"""The `batch.finished` callback (README: Batches): one per completion of a batch
(tasks.batches.completion), signed as every callback is (tasks.delivery.signing, one message id
per completion), POSTed through the same SSRF guard and HTTP client, retried on the
application's schedule (tasks.delivery.retry_policy), every attempt recorded.

At least once: an attempt is claimed by a guarded UPDATE on the batch (its number and the
completion must match, so a duplicate job makes no second attempt) that also sets
`callback_next_attempt_at` past the attempt's longest run; the reconciler re-enqueues a callback
whose due time has passed (a job lost with Redis, a worker killed mid-attempt).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import redis
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from tasks import credentials, jsonsafety
from tasks.applications import cached_application
from tasks.batches.follow import counts_of
from tasks.delivery import callbacks, endpoints, health, retry_policy, signing, ssrf, webhook_http
from tasks.delivery.callbacks import USER_AGENT
from tasks.delivery.webhook_http import Outcome
from tasks.models import Batch, BatchCallbackAttempt, CallbackStatus
from tasks.plumbing.queueing import delete_job, enqueue_delivery_job, redis_client
from tasks.presenters import batch_callback_body

logger = logging.getLogger(__name__)

LEASE_EXTRA_SECONDS = 60  # past the attempt's timeout, before the reconciler calls it lost
RESUME_LIMIT = 200  # lost callbacks the reconciler re-enqueues a pass
# While its endpoint's circuit is open a callback waits this long at a time (the reconciler
# tries it again when due), spending no attempt.
CIRCUIT_WAIT_SECONDS = 30

# KEYS: the endpoint's circuit. ARGV: the job id. A half-open circuit lets one delivery through
# as its probe: this one, if no other took it first.
TAKE_PROBE = """
if redis.call('GET', KEYS[1]) == 'half' then
  redis.call('SET', KEYS[1], 'probe:' .. ARGV[1], 'EX', 86400)
  return 1
end
return 0
"""


def _job_id(batch_id: uuid.UUID | str, completion: int, attempt: int) -> str:
    return f"bcb-{uuid.UUID(str(batch_id)).hex}-{completion}-a{attempt}"


def _enqueue(*, batch: Batch, attempt: int, delay: float = 0.0) -> bool:
    """Put attempt `attempt` on the callbacks queue (now or after `delay`); False when it is
    there already or Redis is away (the reconciler schedules it from the database)."""
    application = cached_application(batch.application_id)
    try:
        return enqueue_delivery_job(
            "tasks.jobs.deliver_batch_callback",
            job_id=_job_id(batch.id, batch.completions, attempt),
            delay=delay,
            args=(str(batch.id), batch.completions, attempt),
            job_timeout=int(application.callback_timeout_seconds) + 30,
            failure_ttl=application.retention_hours * 3600,
            description=f"batch.finished {batch.id} ({attempt})",
        )
    except redis.RedisError:
        logger.warning("could not schedule batch callback; the reconciler will",
                       extra={"batch_id": str(batch.id)}, exc_info=True)  # fmt: skip
        return False


def schedule_first(*, batch_id: uuid.UUID | str) -> bool:
    """After the batch finished (completion.settle): attempt 1, if it has a callback due (and
    the publishes to its application's destinations, tasks.delivery.destinations)."""
    from tasks.delivery import destinations  # a sibling rule, kept out of this module's imports

    destinations.schedule_batch(batch_id=batch_id)
    batch = Batch.objects.filter(pk=batch_id, callback_status=CallbackStatus.PENDING).first()
    if batch is None:
        return False
    return _enqueue(batch=batch, attempt=batch.callback_attempts + 1)


def resume_lost(*, now: datetime | None = None, limit: int = RESUME_LIMIT) -> int:
    """Reconciler: re-enqueue the next attempt of each pending callback past its due time (a
    retry's, or an attempt's lease). An ended job under that attempt's id is dropped first; a
    job still waiting or running is left (the unique enqueue refuses it)."""
    now = now or timezone.now()
    due = Batch.objects.filter(
        callback_status=CallbackStatus.PENDING, callback_next_attempt_at__lte=now
    ).order_by("callback_next_attempt_at")[:limit]
    resumed = 0
    for batch in due:
        attempt = batch.callback_attempts + 1
        with contextlib.suppress(redis.RedisError):
            delete_job(_job_id(batch.id, batch.completions, attempt), unless_live=True)
        resumed += _enqueue(batch=batch, attempt=attempt)
    return resumed


def _claim(batch_id: str, completion: int, attempt: int, lease_seconds: float) -> Batch | None:
    lease = timezone.now() + timedelta(seconds=lease_seconds)
    claimable = Batch.objects.filter(
        pk=batch_id, completions=completion, callback_status=CallbackStatus.PENDING,
        callback_attempts=attempt - 1,
    )  # fmt: skip
    won = claimable.update(
        callback_attempts=F("callback_attempts") + 1, callback_next_attempt_at=lease
    )
    if not won:
        return None
    return Batch.objects.get(pk=batch_id)


def _send(batch: Batch, attempt: int) -> Outcome:
    try:
        target = ssrf.checked_target(batch.callback_url)
    except ssrf.UnsafeCallbackUrl as exc:
        return Outcome(error=f"refused by the SSRF guard: {exc}")
    application = cached_application(batch.application_id)
    body = signing.encode_body(batch_callback_body(batch, counts=counts_of(batch_id=batch.id)))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Taskhook-Attempt": str(attempt),
        **signing.signature_headers(
            **credentials.signing_material(application),
            message_id=signing.batch_webhook_id(batch.id, batch.completions),
            timestamp=int(time.time()),
            body=body,
        ),
    }
    return webhook_http.post(
        target=target, body=body, headers=headers, timeout=application.callback_timeout_seconds
    )


def _circuit_allows(endpoint: str, job_id: str) -> str:
    """ "send", "wait" (the circuit is open, or another delivery probes it) or "refuse" (the
    endpoint is disabled), by the endpoint's circuit (tasks.delivery.health); a half-open one
    makes this callback its probe. The in-flight cap is the task callbacks': a batch has one
    callback per completion."""
    circuit = endpoints.circuit_of(endpoint=endpoint)
    if circuit is None or circuit == f"probe:{job_id}":
        return "send"
    if circuit == "disabled":
        return "refuse"
    if circuit == "half":
        key = endpoints.CIRCUIT_KEY.format(endpoint=endpoint)
        with contextlib.suppress(redis.RedisError):
            if redis_client().eval(TAKE_PROBE, 1, key, job_id):
                return "send"
    return "wait"


def _wait_for_circuit(batch_id: str, completion: int, attempt: int) -> bool:
    """The callback waits (its attempt unspent) until the reconciler tries it again."""
    return bool(
        Batch.objects.filter(
            pk=batch_id, completions=completion, callback_status=CallbackStatus.PENDING,
            callback_attempts=attempt - 1,
        ).update(
            callback_next_attempt_at=timezone.now() + timedelta(seconds=CIRCUIT_WAIT_SECONDS)
        )
    )  # fmt: skip


def deliver(*, batch_id: uuid.UUID | str, completion: int, attempt: int) -> str:
    """Make attempt `attempt` of the batch's callback, record it, schedule the next. While the
    endpoint's circuit is open the callback waits, spending no attempt; a disabled endpoint's
    refusal is recorded as the attempt, and the callback fails."""
    batch_id = str(uuid.UUID(str(batch_id)))
    found = Batch.objects.filter(pk=batch_id).values_list("application_id", "callback_url").first()
    if found is None:
        return "skipped: batch gone"
    application = cached_application(found[0])
    endpoint = endpoints.endpoint_of(application_id=found[0], callback_url=found[1])
    verdict = _circuit_allows(endpoint, _job_id(batch_id, completion, attempt))
    if verdict == "wait":
        _wait_for_circuit(batch_id, completion, attempt)
        return "waiting: the endpoint's circuit is open"
    timeout = application.callback_timeout_seconds
    batch = _claim(batch_id, completion, attempt, timeout + LEASE_EXTRA_SECONDS)
    if batch is None:
        return "skipped: attempt already made, batch reopened, or callback settled"
    started_at = timezone.now()
    if verdict == "refuse":
        _record(batch, completion, attempt, started_at,
                Outcome(error=health.disabled_error(application)), final=True)  # fmt: skip
        return "failed: the endpoint is disabled"
    try:
        outcome = _send(batch, attempt)
    except Exception as exc:  # signing, encoding, a bug: the claimed attempt is still recorded
        logger.exception("batch callback attempt could not be made",
                         extra={"batch_id": batch_id})  # fmt: skip
        outcome = Outcome(error=jsonsafety.clean_text(f"{type(exc).__name__}: {exc}")[:2000])
    recorded = health.record(
        endpoint=endpoint, delivered=outcome.delivered,
        circuit_failures=application.circuit_failures,
    )  # fmt: skip
    if recorded is not None and recorded.changed and recorded.circuit == health.Circuit.CLOSED:
        # This was the probe and it closed the circuit: the task callbacks waiting go on.
        cap = application.endpoint_max_in_flight
        callbacks.enqueue_promoted(endpoints.release(endpoint=endpoint, cap=cap))
    return _record(batch, completion, attempt, started_at, outcome)


def _record(
    batch: Batch,
    completion: int,
    attempt: int,
    started_at: datetime,
    outcome: Outcome,
    *,
    final: bool = False,
) -> str:
    """Record the attempt and settle the callback (delivered, failed, or its retry scheduled;
    `final`: failed without a retry)."""
    batch_id = str(batch.id)
    application = cached_application(batch.application_id)
    delay = None
    fields: dict[str, Any]
    if outcome.delivered:
        result, fields = "delivered", {"callback_status": CallbackStatus.DELIVERED}
    elif final:
        result, fields = "failed", {"callback_status": CallbackStatus.FAILED}
    else:
        delay = retry_policy.next_delay(
            schedule=list(application.retry_schedule), auto_attempt=attempt,
            status_code=outcome.status_code, retry_after=outcome.retry_after,
        )  # fmt: skip
        if delay is None:
            result, fields = "failed", {"callback_status": CallbackStatus.FAILED}
        else:
            result = "retrying"
            fields = {"callback_next_attempt_at": timezone.now() + timedelta(seconds=delay)}
    if result != "retrying":
        fields["callback_next_attempt_at"] = None
    with transaction.atomic():
        BatchCallbackAttempt.objects.create(
            batch_id=batch_id, completion=completion, number=attempt, started_at=started_at,
            url=batch.callback_url, status_code=outcome.status_code,
            response_excerpt=outcome.excerpt, error=outcome.error[:2000],
            duration_ms=outcome.duration_ms, delivered=outcome.delivered,
        )  # fmt: skip
        settled = Batch.objects.filter(
            pk=batch_id, completions=completion, callback_status=CallbackStatus.PENDING
        ).update(**fields)
    log_extra = {"batch_id": batch_id, "attempt": attempt}
    logger.info("batch callback %s", result if outcome.delivered else f"{result}: {outcome.error}",
                extra=log_extra)  # fmt: skip
    if delay is not None and settled:
        batch.callback_attempts = attempt
        _enqueue(batch=batch, attempt=attempt + 1, delay=delay)
    return result
