"""Taskhook's domain tables. Behaviour lives in services; these are data and indexes."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tasks.plumbing.queueing import task_job_id
from tasks.statuses import CallbackStatus, Priority, TaskStatus, is_finished


def default_retry_schedule() -> list[int]:
    return [10, 60, 300]


class Application(models.Model):
    """One client-facing workflow: its runner, keys, secret and per-app policies."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    runner = models.CharField(
        max_length=255,
        help_text="echo, sleep, fail, http, openai, dify, or a dotted path to run(inputs, ctx)",
    )
    runner_config = models.JSONField(default=dict, blank=True)

    # Webhook signing. During a rotation's grace period the previous secret signs as well.
    webhook_secret = models.CharField(max_length=100)
    previous_webhook_secret = models.CharField(max_length=100, blank=True, default="")
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)

    class Signing(models.TextChoices):
        """What signs a delivery (tasks.delivery.signing): the secret, the key pair, or both."""

        HMAC = "hmac", "HMAC"
        ED25519 = "ed25519"
        BOTH = "both", "Both (HMAC and Ed25519)"

    # Ed25519 signing (`v1a`): the private key in clear like the secret (`whsk_` + base64 of its
    # raw bytes; the worker signs with it), made when signing first needs one. The public halves
    # of the current key and of a previous one in its grace period are in the JWKS.
    signing = models.CharField(max_length=8, choices=Signing.choices, default=Signing.HMAC)
    signing_key = models.CharField(max_length=100, blank=True, default="")
    signing_key_id = models.CharField(max_length=40, blank=True, default="")
    previous_signing_key = models.CharField(max_length=100, blank=True, default="")
    previous_signing_key_id = models.CharField(max_length=40, blank=True, default="")
    previous_signing_key_expires_at = models.DateTimeField(null=True, blank=True)

    # Callback delivery policy.
    retry_schedule = models.JSONField(
        default=default_retry_schedule, help_text="seconds between callback retries"
    )
    callback_timeout_seconds = models.FloatField(
        default=10.0, validators=[MinValueValidator(0.5), MaxValueValidator(60)]
    )
    # Deliveries in flight at once per callback origin, across all callback workers (0 = no
    # cap): a hung receiver holds at most this many delivery threads (tasks.delivery.endpoints).
    endpoint_max_in_flight = models.PositiveIntegerField(
        default=4, validators=[MaxValueValidator(1000)]
    )
    # Circuit breaking (tasks.delivery.health): consecutive failed attempts that open an
    # endpoint's circuit, and how long it may fail without a success before it is disabled.
    circuit_failures = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1), MaxValueValidator(10_000)]
    )
    disable_after_hours = models.PositiveIntegerField(
        default=120, validators=[MinValueValidator(1), MaxValueValidator(365 * 24)]
    )

    # Execution policy.
    blocking_timeout_seconds = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.1), MaxValueValidator(300)]
    )
    job_timeout_seconds = models.PositiveIntegerField(
        default=600, validators=[MinValueValidator(1), MaxValueValidator(7 * 24 * 3600)]
    )
    task_retries = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(10)])
    max_concurrency = models.PositiveIntegerField(null=True, blank=True)

    # Scheduling (tasks.scheduling): the lane of a submit that names none, the runs at once per
    # end user (`concurrency_key`, else `user`), and how long a run may wait to start.
    default_priority = models.CharField(
        max_length=8, choices=Priority.choices, default=Priority.NORMAL
    )
    max_concurrency_per_key = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    max_queue_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(7 * 24 * 3600)]
    )
    # Automatic new runs after a retryable failure (tasks.execution.auto_retry): how many, and
    # the wait before the first (doubling for each next one).
    auto_retry = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(10)])
    auto_retry_backoff_seconds = models.FloatField(
        default=5.0, validators=[MinValueValidator(0), MaxValueValidator(3600)]
    )

    # Stuck-task thresholds for alerts.
    queue_threshold_seconds = models.PositiveIntegerField(default=300)
    run_threshold_seconds = models.PositiveIntegerField(default=1800)

    # Per-key token bucket.
    # 0 = unlimited: tasks.api.ratelimit skips the bucket.
    rate_limit_per_second = models.FloatField(default=20.0, validators=[MinValueValidator(0)])
    rate_limit_burst = models.PositiveIntegerField(default=40, validators=[MinValueValidator(1)])

    retention_hours = models.PositiveIntegerField(
        default=24, validators=[MinValueValidator(1), MaxValueValidator(365 * 24)]
    )

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """A bearer key for one application. Only its SHA-256 is stored; the prefix is for display."""

    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="api_keys")
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Set when rotated: the key keeps working until then (grace period), and never after.
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}…"


class Task(models.Model):
    # A batch's items get time-ordered ids instead (tasks.submission.new_tasks, tasks.plumbing.ids).
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: task_app_status_idx and task_retention_idx both lead with it, and
    # every index is rewritten on each status change.
    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="tasks", db_index=False
    )
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    run = models.PositiveIntegerField(default=1)

    inputs = models.JSONField(default=dict)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    progress = models.PositiveSmallIntegerField(default=0)
    user = models.CharField(max_length=255, blank=True, default="")
    response_mode = models.CharField(max_length=16, default="async")

    # NULL (not ""): the unique constraint applies only to tasks that sent a key.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_hash = models.CharField(max_length=64, blank=True, default="")

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    worker_name = models.CharField(max_length=255, blank=True, default="")
    cancel_requested = models.BooleanField(default=False)

    # Callback state, denormalised from the attempts so that polls and lists need no join.
    callback_url = models.CharField(max_length=2048, blank=True, default="")
    callback_status = models.CharField(
        max_length=16, choices=CallbackStatus.choices, default=CallbackStatus.NONE
    )
    callback_attempts = models.PositiveIntegerField(default=0)
    callback_last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    callback_next_attempt_at = models.DateTimeField(null=True, blank=True)
    # The intermediate webhook events the client asked for (tasks.events.kinds), comma-separated
    # in canonical order; "" is the default, only task.finished.
    callback_events = models.CharField(max_length=64, blank=True, default="")

    # What the current run's runner streamed with ctx.emit, in order (written in batches).
    streamed_output = models.TextField(blank=True, default="")

    # Scheduling (tasks.scheduling).
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    concurrency_key = models.CharField(max_length=255, blank=True, default="")
    queued_at = models.DateTimeField(null=True, blank=True)  # when the current run was queued
    # The client's bound on the whole task (Cancel-After / deadline_seconds), and the
    # application's bound on the current run's wait (max_queue_seconds).
    deadline_at = models.DateTimeField(null=True, blank=True)
    start_by = models.DateTimeField(null=True, blank=True)
    # Why a run failed, for machines: null, or e.g. "deadline_exceeded" (tasks.statuses).
    error_code = models.CharField(max_length=32, null=True, blank=True)  # noqa: DJ001
    # Automatic retries: whether the submit allows them (`retry`), and how many were made.
    auto_retry = models.BooleanField(default=True)
    auto_retries = models.PositiveSmallIntegerField(default=0)

    # Failure triage (tasks.triage): the normalised error of a failed run and of a callback the
    # retry policy gave up on, so the Failures page groups by an index, not a scan.
    error_fingerprint = models.CharField(max_length=16, blank=True, default="")
    callback_error_fingerprint = models.CharField(max_length=16, blank=True, default="")

    # The batch the task is an item of (tasks.batches), and its place in the batch's items.
    batch = models.ForeignKey(
        "Batch", null=True, blank=True, on_delete=models.CASCADE, related_name="items",
        db_index=False,
    )  # fmt: skip
    batch_index = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        indexes = [
            # Dashboard list, newest first, with and without filters (keyset on created_at, id).
            models.Index(fields=["-created_at", "-id"], name="task_created_idx"),
            models.Index(
                fields=["application", "status", "-created_at"], name="task_app_status_idx"
            ),
            models.Index(fields=["status", "-created_at"], name="task_status_idx"),
            # Every status change rewrites each index that holds the row, so indexes that only
            # some tasks need are partial: a task without a callback, user or finish time costs
            # them nothing (a pending -> running update touches 4 indexes rather than 8).
            models.Index(
                fields=["callback_status", "-created_at"],
                name="task_callback_part_idx",
                condition=~Q(callback_status=CallbackStatus.NONE),
            ),
            models.Index(
                fields=["user", "-created_at"], name="task_user_part_idx", condition=~Q(user="")
            ),
            # Failures page: the tasks of one error group, latest first.
            models.Index(
                fields=["error_fingerprint", "-finished_at"],
                name="task_failure_part_idx",
                condition=Q(status=TaskStatus.FAILED),
            ),
            models.Index(
                fields=["callback_error_fingerprint", "-finished_at"],
                name="task_cb_failure_part_idx",
                condition=Q(callback_status=CallbackStatus.FAILED),
            ),
            # The task list filtered to one error group, newest first (keyset on created_at).
            models.Index(
                fields=["error_fingerprint", "-created_at", "-id"],
                name="task_failure_list_part_idx",
                condition=Q(status=TaskStatus.FAILED),
            ),
            models.Index(
                fields=["callback_error_fingerprint", "-created_at", "-id"],
                name="task_cb_failure_list_part_idx",
                condition=Q(callback_status=CallbackStatus.FAILED),
            ),
            # Callbacks waiting for their next retry, soonest first.
            models.Index(
                fields=["callback_next_attempt_at", "id"],
                name="task_cb_next_part_idx",
                condition=Q(callback_next_attempt_at__isnull=False),
            ),
            # The task list filtered by priority lane, newest first.
            models.Index(fields=["priority", "-created_at", "-id"], name="task_priority_idx"),
            # The deadline sweep: unfinished tasks with a deadline, soonest first.
            models.Index(
                fields=["deadline_at"],
                name="task_deadline_part_idx",
                condition=Q(deadline_at__isnull=False)
                & Q(status__in=[TaskStatus.PENDING, TaskStatus.RUNNING]),
            ),
            models.Index(
                fields=["start_by"],
                name="task_start_by_part_idx",
                condition=Q(start_by__isnull=False) & Q(status=TaskStatus.PENDING),
            ),
            # Retention: finished tasks by application and finish time.
            models.Index(
                fields=["application", "finished_at"],
                name="task_retention_part_idx",
                condition=Q(finished_at__isnull=False),
            ),
            # A batch's items in index order (counts, results, cancel); no cost to other tasks.
            models.Index(
                fields=["batch", "batch_index"],
                name="task_batch_part_idx",
                condition=Q(batch__isnull=False),
            ),
            # Whether a batch has an unfinished item: one probe per item finishing
            # (tasks.batches.completion), whatever the batch's size.
            models.Index(
                fields=["batch"],
                name="task_batch_unfinished_part_idx",
                condition=Q(batch__isnull=False, status__in=["pending", "running"]),
            ),
        ]
        permissions = [
            ("operate", "Can retry, cancel, redeliver and configure from the dashboard"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["application", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="task_idempotency_unique",
            ),
            models.CheckConstraint(
                condition=Q(progress__gte=0) & Q(progress__lte=100), name="task_progress_range"
            ),
        ]

    def __str__(self) -> str:
        return str(self.id)

    @property
    def is_finished(self) -> bool:
        return is_finished(self.status)

    @property
    def rq_job_id(self) -> str:
        return task_job_id(self.id, self.run)


class Batch(models.Model):
    """Many tasks submitted in one request (tasks.batches); each item is an ordinary Task."""

    class Status(models.TextChoices):
        RUNNING = "running"  # some item has not finished
        FINISHED = "finished"
        CANCELLED = "cancelled"  # a cancel was requested, and every item has finished

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="batches", db_index=False
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    total = models.PositiveIntegerField()
    callback_url = models.CharField(max_length=2048, blank=True, default="")
    callback_events = models.CharField(max_length=64, blank=True, default="")
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    metadata = models.JSONField(default=dict, blank=True)
    cancel_requested = models.BooleanField(default=False)
    # NULL (not ""): the unique constraint applies only to batches that sent a key.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_hash = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The `batch.finished` callback (tasks.delivery.batch_callbacks): one per completion, a
    # batch finishing again after a retry of its items counting a new one; attempts count
    # within the current completion.
    completions = models.PositiveIntegerField(default=0)
    callback_status = models.CharField(
        max_length=16, choices=CallbackStatus.choices, default=CallbackStatus.NONE
    )
    callback_attempts = models.PositiveIntegerField(default=0)
    callback_next_attempt_at = models.DateTimeField(null=True, blank=True)
    # The API's origin as the submit reached it: the callback's results_url is built from it.
    base_url = models.CharField(max_length=2048, blank=True, default="")
    # While its items are being stored (tasks.batches.ingest): never settled meanwhile.
    ingesting = models.BooleanField(default=False)

    class Meta:
        indexes = [
            models.Index(fields=["application", "-created_at"], name="batch_app_created_idx"),
            models.Index(fields=["-created_at"], name="batch_created_idx"),
            # The reconciler's sweeps: batches not yet settled, callbacks due.
            models.Index(
                fields=["created_at"],
                name="batch_running_part_idx",
                condition=Q(status="running"),
            ),
            models.Index(
                fields=["callback_next_attempt_at"],
                name="batch_callback_due_part_idx",
                condition=Q(callback_status="pending"),
            ),
            models.Index(
                fields=["created_at"],
                name="batch_ingesting_part_idx",
                condition=Q(ingesting=True),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["application", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="batch_idempotency_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"batch {self.id} ({self.total} items)"


class TaskRunHistory(models.Model):
    """What an earlier run of a task ended with, kept when an operator starts a new run."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="past_runs")
    run = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=TaskStatus.choices)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    error_code = models.CharField(max_length=32, null=True, blank=True)  # noqa: DJ001
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The next run was started by an automatic retry, not by an operator.
    retried_automatically = models.BooleanField(default=False)

    class Meta:
        ordering = ["task", "run"]
        constraints = [
            models.UniqueConstraint(fields=["task", "run"], name="task_run_history_unique")
        ]

    def __str__(self) -> str:
        return f"{self.task_id} run {self.run}: {self.status}"


class TaskLog(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="logs")
    run = models.PositiveIntegerField(default=1)
    level = models.CharField(max_length=10, default="info")
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["task", "id"], name="tasklog_task_idx")]

    def __str__(self) -> str:
        return f"[{self.level}] {self.message[:60]}"


class AttemptTrigger(models.TextChoices):
    AUTO = "auto"
    MANUAL = "manual"


class CallbackAttempt(models.Model):
    """One HTTP POST of a task run's result to its callback URL."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="callback_attempt_rows")
    run = models.PositiveIntegerField()
    number = models.PositiveIntegerField()
    trigger = models.CharField(max_length=8, choices=AttemptTrigger.choices)
    started_at = models.DateTimeField()
    url = models.CharField(max_length=2048)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    delivered = models.BooleanField(default=False)
    # The endpoint (tasks.delivery.health) the attempt went to: its page and its recent success
    # rate and latency read the last attempts through endpoint_attempt_idx.
    endpoint = models.ForeignKey(
        "Endpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="attempts",
        db_index=False,
    )  # fmt: skip

    class Meta:
        ordering = ["task", "run", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "run", "number"], name="callback_attempt_unique"
            )
        ]
        indexes = [
            models.Index(fields=["-started_at"], name="attempt_started_idx"),
            models.Index(fields=["endpoint", "-started_at"], name="endpoint_attempt_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} run {self.run} attempt {self.number}"


class BatchCallbackAttempt(models.Model):
    """One POST of a batch's `batch.finished` to its callback URL."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="callback_attempt_rows")
    completion = models.PositiveIntegerField()
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    url = models.CharField(max_length=2048)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    delivered = models.BooleanField(default=False)

    class Meta:
        ordering = ["batch", "completion", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["batch", "completion", "number"], name="batch_attempt_unique"
            )
        ]

    def __str__(self) -> str:
        return f"batch {self.batch_id} attempt {self.number}"


class AuditEntry(models.Model):
    """Who did what to which target, when: every dashboard action writes one."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=64, blank=True, default="")
    # The target's name when the action was taken: it still reads after the target is deleted.
    target_label = models.CharField(max_length=200, blank=True, default="")
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="audit_created_idx"),
            models.Index(fields=["username", "-id"], name="audit_actor_idx"),
            models.Index(fields=["action", "-id"], name="audit_action_idx"),
            models.Index(fields=["target_type", "target_id", "-id"], name="audit_target_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.username} {self.action} {self.target_type}:{self.target_id}"


class BulkOperation(models.Model):
    """A background 'retry / redeliver all matching' run, with its progress."""

    class Kind(models.TextChoices):
        RETRY = "retry"
        REDELIVER = "redeliver"
        RUN_NOW = "run_now"  # a deferred or scheduled task to the front of its queue
        DELIVER_NOW = "deliver_now"  # a callback waiting for its retry, attempted now
        DISCARD = "discard"  # stop the waiting work, keep the record
        DELETE = "delete"  # remove the tasks with their logs and attempts
        CANCEL_BATCH = "cancel_batch", "Cancel batch"  # tasks.batches.control.cancel_batch
        RECOVER = "recover"  # redeliver the callbacks that failed since T (tasks.delivery.health)

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    filters = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    processed = models.PositiveIntegerField(default=0)
    affected = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.status} {self.processed}"


class ErrorGroup(models.Model):
    """One normalised error (tasks.triage): its label, and when it was first and last seen.
    Upserted when a run fails or a callback is given up; the counts come from the indexes
    on Task.error_fingerprint / callback_error_fingerprint."""

    class Kind(models.TextChoices):
        TASK = "task"
        CALLBACK = "callback"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    fingerprint = models.CharField(max_length=16)
    label = models.TextField()
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "fingerprint"], name="error_group_unique")
        ]
        indexes = [models.Index(fields=["kind", "-last_seen"], name="error_group_recent_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.fingerprint}: {self.label[:60]}"


class StatsRollup(models.Model):
    """Counts per application per minute (kept a day) and per hour (kept longer), written by
    the cron process from the Redis counters (tasks.telemetry.rollups)."""

    class Resolution(models.TextChoices):
        MINUTE = "minute"
        HOUR = "hour"

    resolution = models.CharField(max_length=8, choices=Resolution.choices)
    bucket = models.DateTimeField()
    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="+")
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    callbacks_delivered = models.PositiveIntegerField(default=0)
    callbacks_failed = models.PositiveIntegerField(default=0)
    # Tasks waiting (pending), the highest sample in the bucket.
    queued_max = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["resolution", "bucket", "application"], name="stats_rollup_unique"
            )
        ]
        indexes = [models.Index(fields=["resolution", "bucket"], name="stats_rollup_range_idx")]

    def __str__(self) -> str:
        return f"{self.resolution} {self.bucket:%Y-%m-%d %H:%M} {self.application_id}"


class PausedQueue(models.Model):
    """A queue an operator paused. Kept here so that a pause outlives a Redis restart; the
    workers read the Redis copy (tasks.execution.pausing), which the reconciler re-asserts."""

    name = models.CharField(max_length=100, primary_key=True)
    paused_at = models.DateTimeField(default=timezone.now)
    paused_by = models.CharField(max_length=150)

    def __str__(self) -> str:
        return f"{self.name} paused by {self.paused_by}"


class CleanupRun(models.Model):
    """One retention pass: when, why, and how many tasks it removed per application."""

    class Trigger(models.TextChoices):
        SCHEDULED = "scheduled"
        MANUAL = "manual"
        COMMAND = "command"

    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    dry_run = models.BooleanField(default=False)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    removed = models.JSONField(default=dict, blank=True)  # {app_id: {"name": …, "tasks": n}}
    total_removed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"cleanup {self.trigger} {self.started_at:%Y-%m-%d %H:%M}: {self.total_removed}"


class IdempotencyRecord(models.Model):
    """An Idempotency-Key that outlives its task: kept when retention removes the task before
    the key's window ends, so a client's late retry gets the original task id, not a new run."""

    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    task_id = models.UUIDField()
    status = models.CharField(max_length=16, choices=TaskStatus.choices)
    # The task's own created_at: the window is counted from the first submit.
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["application", "key"], name="idempotency_record_unique")
        ]
        indexes = [models.Index(fields=["created_at"], name="idempotency_record_age_idx")]

    def __str__(self) -> str:
        return f"{self.key} -> {self.task_id}"


class Destination(models.Model):
    """A message bus an application's results are published to besides (or instead of) its
    webhooks (tasks.delivery.destinations): a Redis Stream, a RabbitMQ exchange or a NATS
    JetStream subject, named by its URL."""

    class Kind(models.TextChoices):
        REDIS = "redis", "Redis Stream"
        AMQP = "amqp", "RabbitMQ"
        NATS = "nats", "NATS JetStream"

    class Circuit(models.TextChoices):  # the same values as Endpoint.Circuit
        CLOSED = "closed"
        OPEN = "open"
        HALF_OPEN = "half_open", "Half-open"

    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="destinations"
    )
    kind = models.CharField(max_length=8, choices=Kind.choices)
    url = models.CharField(max_length=2048)  # may hold a password: shown only masked
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Health and circuit, kept by every attempt as an endpoint's are (tasks.delivery.health,
    # which reads the same field names on both models). `enabled` is False while disabled.
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    failing_since = models.DateTimeField(null=True, blank=True)
    circuit = models.CharField(max_length=9, choices=Circuit.choices, default=Circuit.CLOSED)
    circuit_changed_at = models.DateTimeField(null=True, blank=True)
    next_probe_at = models.DateTimeField(null=True, blank=True)
    probe_interval_seconds = models.PositiveIntegerField(default=0)
    disabled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["application", "id"]
        indexes = [
            # The reconciler's probes and auto-disable: only destinations that are failing.
            models.Index(
                fields=["failing_since"],
                name="destination_failing_part_idx",
                condition=Q(failing_since__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return self.masked_url

    @property
    def masked_url(self) -> str:
        from tasks.delivery.destinations import mask_url  # the rule's module reads the models

        return mask_url(self.url)


class DestinationAttempt(models.Model):
    """One publish of a task run's result (or a batch's `batch.finished`) to a destination."""

    destination = models.ForeignKey(Destination, on_delete=models.CASCADE, related_name="attempts")
    task = models.ForeignKey(
        Task, on_delete=models.CASCADE, null=True, blank=True, related_name="destination_attempts"
    )
    batch = models.ForeignKey(
        Batch, on_delete=models.CASCADE, null=True, blank=True, related_name="destination_attempts"
    )
    run = models.PositiveIntegerField()  # the task's run, or the batch's completion
    number = models.PositiveIntegerField()
    trigger = models.CharField(max_length=8, choices=AttemptTrigger.choices)
    started_at = models.DateTimeField()
    delivered = models.BooleanField(default=False)
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    # When the automatic retry this failure scheduled is due (the reconciler's clue that its job
    # vanished with Redis); null when none was scheduled.
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["destination", "started_at", "id"]
        indexes = [
            models.Index(fields=["task", "run"], name="dest_attempt_task_idx"),
            models.Index(fields=["next_attempt_at"], name="dest_attempt_next_idx"),
            # A destination's page, its recent success rate and latency, and its recover.
            models.Index(fields=["destination", "-started_at"], name="dest_attempt_recent_idx"),
        ]

    def __str__(self) -> str:
        return f"destination {self.destination_id} attempt {self.number}"


class Endpoint(models.Model):
    """An application's callback origin and its health (tasks.delivery.health): the counters
    each attempt's one upsert keeps, its circuit, and whether it was disabled."""

    class Circuit(models.TextChoices):
        CLOSED = "closed"
        OPEN = "open"
        HALF_OPEN = "half_open", "Half-open"

    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="+")
    origin = models.CharField(max_length=300)  # scheme://host:port (endpoints.endpoint_of)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    # The first failure after the last success: how long the endpoint has been failing.
    failing_since = models.DateTimeField(null=True, blank=True)
    circuit = models.CharField(max_length=9, choices=Circuit.choices, default=Circuit.CLOSED)
    # When the circuit last changed state: the one statement that records an attempt tells by it
    # whether that attempt opened or closed the circuit.
    circuit_changed_at = models.DateTimeField(null=True, blank=True)
    next_probe_at = models.DateTimeField(null=True, blank=True)
    probe_interval_seconds = models.PositiveIntegerField(default=0)
    disabled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["application", "origin"]
        constraints = [
            models.UniqueConstraint(fields=["application", "origin"], name="endpoint_unique")
        ]
        indexes = [
            # The reconciler's probes and auto-disable: only endpoints that are failing.
            models.Index(
                fields=["failing_since"],
                name="endpoint_failing_part_idx",
                condition=Q(failing_since__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.origin} ({self.circuit})"
