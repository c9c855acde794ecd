"""Callback delivery: scheduling, one attempt, its record, and what comes next (README: Callbacks).

Deliveries run on their own RQ queue (`callbacks`), so a slow receiver never delays task
execution; several callback workers keep one slow receiver from holding up the others. Retries
are RQ scheduled jobs (`enqueue_in`, workers started `--with-scheduler`), so the schedule lives in
Redis and survives worker restarts; the reconciler re-creates any that vanished with Redis from
`callback_next_attempt_at` in the database.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import secrets
import time
import uuid
from datetime import timedelta

import redis
from django.db import transaction
from django.utils import timezone

from tasks import credentials, jsonsafety, state
from tasks.applications import cached_application, current_application
from tasks.delivery import (
    destinations,
    endpoints,
    health,
    retry_policy,
    signing,
    ssrf,
    webhook_http,
)
from tasks.delivery.webhook_http import Outcome
from tasks.models import (
    Application,
    AttemptTrigger,
    CallbackAttempt,
    CallbackStatus,
    Task,
)
from tasks.plumbing import rawsql
from tasks.plumbing.queueing import delete_job, enqueue_delivery_job
from tasks.presenters import callback_body
from tasks.statuses import DELIVERABLE
from tasks.telemetry.metrics import record_callback_attempt

logger = logging.getLogger(__name__)

VERSION = importlib.metadata.version("taskhook")  # pyproject.toml, via the installed package
USER_AGENT = f"Taskhook/{VERSION}"


# --- scheduling -------------------------------------------------------------------------------


def _delivery_job_id(task: Task, trigger: str, auto_attempt: int | None) -> str:
    """Automatic attempts have one id each (a second enqueue of the same attempt is refused);
    manual ones are always new."""
    suffix = f"a{auto_attempt}" if trigger == AttemptTrigger.AUTO else f"m{secrets.token_hex(6)}"
    return f"cb-{task.id}-{task.run}-{suffix}"


def _enqueue_delivery(
    *,
    task: Task,
    trigger: str,
    auto_attempt: int | None = None,
    delay: float = 0.0,
    job_id: str | None = None,
    at_front: bool = False,
) -> bool:
    """Put a delivery job on the callbacks queue (now, or after `delay` seconds).

    False when it was not added: the same job already exists, or Redis is unreachable (the
    reconciler schedules it later from the database).
    """
    application = task.application
    endpoint = endpoints.endpoint_of(application_id=application.id, callback_url=task.callback_url)
    try:
        return enqueue_delivery_job(
            "tasks.jobs.deliver_callback",
            job_id=job_id or _delivery_job_id(task, trigger, auto_attempt),
            delay=delay,
            at_front=at_front,
            args=(str(task.id), task.run, trigger, auto_attempt, endpoint),
            job_timeout=int(application.callback_timeout_seconds) + 30,
            failure_ttl=application.retention_hours * 3600,
            description=f"callback {task.id} run {task.run} ({trigger})",
        )
    except redis.RedisError:
        logger.warning(
            "could not schedule callback; the reconciler will",
            extra={"task_id": str(task.id), "app_id": str(task.application_id)},
            exc_info=True,
        )
        return False


def schedule_first_delivery(
    *,
    task_id: uuid.UUID | str,
    run: int | None = None,
    application: Application | None = None,
    callback_url: str = "",
) -> bool:
    """After a task finished: enqueue attempt 1 if it has a callback due.

    The worker that just finished the run passes `run`, `application` and `callback_url` (it
    set the callback due in the same transition), which saves reading the task back.
    """
    task: Task | None
    if run is not None and application is not None and callback_url:
        task = Task(
            id=uuid.UUID(str(task_id)), run=run, application=application, callback_url=callback_url
        )
    else:
        task = (
            Task.objects.select_related("application")
            .filter(pk=task_id, callback_status=CallbackStatus.PENDING,
                    status__in=DELIVERABLE)
            .first()
        )  # fmt: skip
    if task is None:
        return False
    return _enqueue_delivery(task=task, trigger=AttemptTrigger.AUTO, auto_attempt=1)


def resume_delivery(*, task: Task) -> bool:
    """Re-create a lost automatic delivery job (reconciler): the next attempt in the sequence.

    The job id of that attempt may still name a job that ended without recording it (its worker
    died, or it failed): RQ keeps such a job for the application's retention, and a unique
    enqueue would collide with it every pass. A job that is still waiting or running is left.
    """
    auto_done = CallbackAttempt.objects.filter(
        task_id=task.id, run=task.run, trigger=AttemptTrigger.AUTO
    ).count()
    if is_parked(task=task):
        return False  # waiting its turn on the endpoint (its cap or circuit), not lost
    _drop_ended_job(_delivery_job_id(task, AttemptTrigger.AUTO, auto_done + 1))
    return _enqueue_delivery(task=task, trigger=AttemptTrigger.AUTO, auto_attempt=auto_done + 1)


def _drop_ended_job(job_id: str) -> None:
    with contextlib.suppress(redis.RedisError):  # the enqueue that follows reports Redis trouble
        delete_job(job_id, unless_live=True)


def redeliver(*, task_ids: list[uuid.UUID | str]) -> list[uuid.UUID]:
    """Operator's manual redelivery: one `manual` attempt now per finished task with a callback,
    whatever its automatic state, and one publish to each of its application's destinations.
    Returns the ids that were enqueued (to either)."""
    tasks = (
        Task.objects.select_related("application")
        .filter(pk__in=task_ids, status__in=DELIVERABLE)
        .exclude(callback_url="")
    )
    enqueued: list[uuid.UUID] = []
    for task in tasks:
        state.reopen_delivery(task_id=task.pk, run=task.run)
        if _enqueue_delivery(task=task, trigger=AttemptTrigger.MANUAL):
            enqueued.append(task.id)
    published = destinations.redeliver(task_ids=task_ids)
    return enqueued + [task_id for task_id in published if task_id not in enqueued]


# --- one attempt ------------------------------------------------------------------------------


def _claim_attempt(task_id: uuid.UUID | str, run: int, trigger: str) -> Task | None:
    """Claim the next attempt (tasks.state.claim_delivery). The application comes from a
    per-process cache checked against its `updated_at`, returned by the same statement: a
    rotated secret signs the very next delivery."""
    claimed = state.claim_delivery(
        task_id=task_id, run=run, automatic=trigger == AttemptTrigger.AUTO
    )
    if claimed is None:
        return None
    task = claimed.task
    task.application = current_application(
        task.application_id, updated_at=claimed.application_updated_at
    )
    return task


def _send(task: Task, number: int) -> Outcome:
    """Resolve and check the URL for this attempt, sign, and POST to a checked address."""
    try:
        target = ssrf.checked_target(task.callback_url)
    except ssrf.UnsafeCallbackUrl as exc:
        return Outcome(error=f"refused by the SSRF guard: {exc}")
    application = task.application
    body = signing.encode_body(callback_body(task))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Taskhook-Attempt": str(number),
        **signing.signature_headers(
            **credentials.signing_material(application),
            message_id=signing.webhook_id(task.id, task.run),
            timestamp=int(time.time()),
            body=body,
        ),
    }
    return webhook_http.post(
        target=target, body=body, headers=headers, timeout=application.callback_timeout_seconds
    )


def deliver(
    *,
    task_id: uuid.UUID | str,
    run: int,
    trigger: str,
    auto_attempt: int | None = None,
    endpoint: str = "",
    job_id: str = "",
) -> str:
    """Make one delivery attempt if the endpoint has a free slot (else park it, see
    tasks.delivery.endpoints), record it, and schedule the next one if the policy says so."""
    task_id = str(uuid.UUID(str(task_id)))
    if not endpoint:  # a job enqueued before endpoints were in its arguments
        found = Task.objects.filter(pk=task_id).values_list("application_id", "callback_url")
        if not (row := found.first()):
            return "skipped: task gone"
        endpoint = endpoints.endpoint_of(application_id=row[0], callback_url=row[1])
    application = cached_application(endpoint.partition("|")[0])
    cap = application.endpoint_max_in_flight
    job_id = job_id or f"direct-{secrets.token_hex(6)}"
    parked = endpoints.ParkedDelivery(task_id, run, trigger, auto_attempt, _base_job_id(job_id))
    taken = endpoints.acquire_or_park(
        endpoint=endpoint, cap=cap, job_id=job_id,
        hold_seconds=application.callback_timeout_seconds, parked=parked,
    )  # fmt: skip
    if taken == endpoints.PARKED:
        return "parked: the endpoint's circuit is open or its deliveries in flight are at their cap"
    if taken == endpoints.REFUSED:
        reason = health.disabled_error(application)
        state.give_up_delivery(task_id=task_id, run=run, reason=reason, stalled_too=True)
        return f"failed: {reason}"
    try:
        return _deliver_now(
            task_id=task_id, run=run, trigger=trigger, auto_attempt=auto_attempt, endpoint=endpoint
        )
    finally:
        enqueue_promoted(endpoints.release(endpoint=endpoint, cap=cap, job_id=job_id))


def _base_job_id(job_id: str) -> str:
    return job_id.split("-p", 1)[0] if job_id.startswith("cb-") else job_id


def enqueue_promoted(promoted: list[endpoints.ParkedDelivery]) -> None:
    """Parked deliveries whose turn came, oldest first: each goes to the front of the queue, so
    the newest goes first and the oldest ends up in front."""
    for waiting in reversed(promoted):
        enqueue_parked(waiting)


def enqueue_parked(parked: endpoints.ParkedDelivery) -> None:
    """A parked delivery whose turn came: back on the callbacks queue, at the front (it waited
    already), under a new id (its old job may still be ending)."""
    task = Task.objects.select_related("application").filter(pk=parked.task_id).first()
    if task is None:
        return
    task.run = parked.run
    _enqueue_delivery(
        task=task, trigger=parked.trigger, auto_attempt=parked.auto_attempt,
        job_id=f"{parked.job_id}-p{secrets.token_hex(4)}", at_front=True,
    )  # fmt: skip


def promote_parked() -> int:
    """Reconciler: enqueue parked deliveries of endpoints whose slots freed without a release
    (a worker died holding one). Returns how many were enqueued."""
    promoted = 0
    for endpoint in endpoints.endpoints_with_waiting():
        application = Application.objects.filter(pk=endpoint.partition("|")[0]).first()
        cap = application.endpoint_max_in_flight if application else 0
        waiting = endpoints.release(endpoint=endpoint, cap=max(cap, 1))
        enqueue_promoted(waiting)
        promoted += len(waiting)
    return promoted


def is_parked(*, task: Task) -> bool:
    """Whether a delivery of the task's run, automatic or an operator's (a recover's), waits
    on its endpoint's cap or circuit: the reconciler leaves it rather than send a second."""
    endpoint = endpoints.endpoint_of(
        application_id=task.application_id, callback_url=task.callback_url
    )
    return endpoints.run_is_parked(endpoint=endpoint, task_id=str(task.id), run=task.run)


def _deliver_now(
    *, task_id: str, run: int, trigger: str, auto_attempt: int | None = None, endpoint: str = ""
) -> str:
    task = _claim_attempt(task_id, run, trigger)
    if task is None:
        return "skipped: task gone or re-run, no callback, or callback already settled"
    auto = trigger == AttemptTrigger.AUTO
    number = task.callback_attempts
    started_at = timezone.now()
    try:
        outcome = _send(task, number)
    except Exception as exc:  # signing, encoding, a bug: the claimed attempt is still recorded
        logger.exception("callback attempt could not be made", extra={"task_id": str(task.id)})
        outcome = Outcome(error=jsonsafety.clean_text(f"{type(exc).__name__}: {exc}")[:2000])
    auto_attempt = auto_attempt or 1
    delay = None
    settle_as: str | None = None  # the callback's new status, if the attempt settles it
    fields: dict = {}
    if outcome.delivered:
        result, settle_as = "delivered", CallbackStatus.DELIVERED
    elif not auto:
        # A manual attempt schedules nothing; an automatic retry already scheduled still runs.
        result = "failed"
    else:
        delay = retry_policy.next_delay(
            schedule=list(task.application.retry_schedule),
            auto_attempt=auto_attempt,
            status_code=outcome.status_code,
            retry_after=outcome.retry_after,
        )
        if delay is None:
            result, settle_as = "failed", CallbackStatus.FAILED
        else:
            next_at = timezone.now() + timedelta(seconds=delay)
            result, fields = "retrying", {"callback_next_attempt_at": next_at}
    recorded = health.record(
        endpoint=endpoint or endpoints.endpoint_of(
            application_id=task.application_id, callback_url=task.callback_url
        ),
        delivered=outcome.delivered, circuit_failures=task.application.circuit_failures,
    )  # fmt: skip
    attempt = rawsql.insert_statement(CallbackAttempt(
        endpoint_id=recorded.endpoint_id if recorded else None,
        task_id=task.id,
        run=run,
        number=number,
        trigger=trigger,
        started_at=started_at,
        url=task.callback_url,
        status_code=outcome.status_code,
        response_excerpt=outcome.excerpt,
        error=outcome.error[:2000],
        duration_ms=outcome.duration_ms,
        delivered=outcome.delivered,
    ))  # fmt: skip
    fields["callback_last_status_code"] = outcome.status_code
    callback_state = state.delivery_outcome(
        task_id=task.id, run=run, to=settle_as, attempt_error=outcome.error, **fields
    )
    if auto or outcome.delivered:
        rawsql.execute_together(attempt, callback_state)  # the attempt and the state: one commit
    else:
        with transaction.atomic():
            rawsql.execute(attempt)
            rawsql.execute(callback_state)
            state.settle_failed_manual_delivery(
                task_id=task.id, run=run, status_code=outcome.status_code,
                attempt_error=outcome.error,
            )  # fmt: skip
    record_callback_attempt(application_id=task.application_id, delivered=outcome.delivered)
    log_extra = {"task_id": str(task.id), "app_id": str(task.application_id), "attempt": number}
    if outcome.delivered:
        logger.info("callback delivered", extra=log_extra)
    else:
        logger.info("callback attempt failed: %s", outcome.error, extra=log_extra)
    if delay is not None:
        _enqueue_delivery(
            task=task, trigger=AttemptTrigger.AUTO, auto_attempt=auto_attempt + 1, delay=delay
        )
    return result
