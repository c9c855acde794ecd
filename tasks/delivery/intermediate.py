"""Intermediate webhook events: `task.started`, `task.progress`, `task.log` and `task.output`,
POSTed to a task's callback_url while it runs, for the kinds its submit listed in
`callback_events` (README: Receiving callbacks, "Events while a task runs").

The rules, all here:
- Coalesced: at most one POST per task per COALESCE_SECONDS. A POST carries one kind, the kind
  of the oldest event waiting; everything of that kind that waits goes with it (progress: the
  latest value; log lines: all, in order; output: the deltas joined, in order). So each kind
  arrives in order, and kinds interleave in the order they began to wait.
- Signed like task.finished (both signatures), each POST with its own `webhook-id`.
- Best effort: one attempt per POST, bounded by the application's callback timeout (at most
  ATTEMPT_TIMEOUT_SECONDS). A failed POST's events wait and go with the next POST; after
  MAX_CONSECUTIVE_FAILURES failures in a row the run's intermediate events are dropped (the
  receiver is down) and none are sent for it any more. Nothing is recorded as an attempt.
- Never in the way of task.finished: it is delivered by the callback queue as before, with its
  retries and attempts; these POSTs come from a thread of the task worker, so a slow receiver
  slows neither the runner nor the final callback (an intermediate POST may even arrive after
  task.finished: receivers order by `event_id` and ignore what comes after the end).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tasks import credentials
from tasks.delivery import signing, ssrf, webhook_http
from tasks.events import catalog
from tasks.models import Application

logger = logging.getLogger(__name__)

COALESCE_SECONDS = 0.5
ATTEMPT_TIMEOUT_SECONDS = 5.0
MAX_CONSECUTIVE_FAILURES = 3
# What one run may hold waiting for a receiver that is slow (beyond it, the oldest is dropped).
MAX_WAITING_EVENTS = 10_000
# How long the end of a run waits for its last coalesced events to be posted.
CLOSE_WAIT_SECONDS = 2 * COALESCE_SECONDS + ATTEMPT_TIMEOUT_SECONDS


@dataclass
class _Waiting:
    kind: str
    data: dict[str, Any]
    event_id: str | None


@dataclass
class RunWebhooks:
    """One run's intermediate webhooks: the executor offers events, the sender thread posts."""

    task_id: uuid.UUID
    run: int
    application: Application
    callback_url: str
    kinds: frozenset[str]
    waiting: list[_Waiting] = field(default_factory=list)
    posts: int = 0
    sent: int = 0
    failures: int = 0
    dropped: int = 0
    suspended: bool = False
    closed: bool = False
    last_post_at: float = 0.0

    def offer(self, event: str, data: dict[str, Any], event_id: str | None = None) -> None:
        kind = catalog.KIND_OF_STREAM_EVENT.get(event)
        if kind is None or kind not in self.kinds:
            return
        _sender().offer(self, _Waiting(kind=kind, data=data, event_id=event_id))

    def close(self, wait_seconds: float = 0.0) -> None:
        """The run ended: what waits is still posted (waiting up to `wait_seconds` for it),
        then the run is forgotten."""
        _sender().close(self, wait_seconds)


def for_run(
    *,
    task_id: uuid.UUID,
    run: int,
    application: Application,
    callback_url: str,
    kinds: Iterable[str],
) -> RunWebhooks | None:
    """The run's intermediate webhooks, or None when its submit asked for none."""
    wanted = frozenset(kinds) & frozenset(catalog.INTERMEDIATE_KINDS)
    if not wanted or not callback_url:
        return None
    return RunWebhooks(
        task_id=task_id, run=run, application=application, callback_url=callback_url, kinds=wanted
    )


def body_of(hooks: RunWebhooks, batch: list[_Waiting]) -> dict[str, Any]:
    """The JSON of one POST: the kind of `batch` (all one kind), coalesced."""
    kind = batch[0].kind
    body: dict[str, Any] = {
        "event": catalog.WEBHOOK_EVENT_OF_KIND[kind],
        "task_id": str(hooks.task_id),
        "run": hooks.run,
        "app_id": str(hooks.application.id),
        "status": "running",
        "event_id": batch[-1].event_id,
    }
    if kind == "started":
        body |= {key: batch[-1].data.get(key) for key in ("started_at", "worker")}
    elif kind == "progress":
        body |= {key: batch[-1].data.get(key) for key in ("progress", "message")}
    elif kind == "log":
        body["logs"] = [
            {key: item.data.get(key) for key in ("level", "message", "at")} for item in batch
        ]
    else:
        body["delta"] = "".join(str(item.data.get("text", "")) for item in batch)
    return body


def _take_batch(hooks: RunWebhooks) -> list[_Waiting]:
    """The waiting events of the oldest waiting kind (they stay waiting until the POST
    succeeds)."""
    kind = hooks.waiting[0].kind
    return [item for item in hooks.waiting if item.kind == kind]


def _post(hooks: RunWebhooks, batch: list[_Waiting]) -> webhook_http.Outcome:
    hooks.posts += 1
    body = signing.encode_body(body_of(hooks, batch))
    try:
        target = ssrf.checked_target(hooks.callback_url)
    except ssrf.UnsafeCallbackUrl as exc:
        return webhook_http.Outcome(error=f"refused by the SSRF guard: {exc}")
    application = hooks.application
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Taskhook",
        **signing.signature_headers(
            **credentials.signing_material(application),
            message_id=f"{signing.webhook_id(hooks.task_id, hooks.run)}_e{hooks.posts}",
            timestamp=int(time.time()),
            body=body,
        ),
    }
    timeout = min(application.callback_timeout_seconds, ATTEMPT_TIMEOUT_SECONDS)
    return webhook_http.post(target=target, body=body, headers=headers, timeout=timeout)


class _Sender:
    """The worker process's one sender thread, started at the first run that needs it."""

    def __init__(self) -> None:
        self._runs: list[RunWebhooks] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def offer(self, hooks: RunWebhooks, item: _Waiting) -> None:
        with self._changed:
            if hooks.suspended:
                hooks.dropped += 1
                return
            if len(hooks.waiting) >= MAX_WAITING_EVENTS:
                hooks.waiting.pop(0)
                hooks.dropped += 1
            hooks.waiting.append(item)
            if hooks not in self._runs:
                self._runs.append(hooks)
            self._start()
            self._changed.notify_all()

    def close(self, hooks: RunWebhooks, wait_seconds: float) -> None:
        with self._changed:
            hooks.closed = True
            if not hooks.waiting and hooks in self._runs:
                self._forget(hooks)
            self._changed.notify_all()
            self._changed.wait_for(lambda: hooks not in self._runs, timeout=wait_seconds)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="taskhook-intermediate-webhooks", daemon=True
            )
            self._thread.start()

    def _forget(self, hooks: RunWebhooks) -> None:
        self._runs.remove(hooks)
        log = logger.warning if hooks.dropped else logger.info
        log(
            "intermediate webhooks of task %s run %s: %d sent, %d failed, %d events dropped",
            hooks.task_id, hooks.run, hooks.sent, hooks.posts - hooks.sent, hooks.dropped,
        )  # fmt: skip

    def _next_due(self) -> tuple[RunWebhooks | None, float]:
        """The run whose POST is due first, and the seconds until it is."""
        now = time.monotonic()
        due = [(hooks.last_post_at + COALESCE_SECONDS - now, hooks) for hooks in self._runs
               if hooks.waiting]  # fmt: skip
        if not due:
            return None, 60.0
        wait, hooks = min(due, key=lambda pair: pair[0])
        return hooks, max(0.0, wait)

    def _loop(self) -> None:
        while True:
            with self._changed:
                hooks, wait = self._next_due()
                if hooks is None or wait > 0:
                    self._changed.wait(timeout=wait)
                    continue
                batch = _take_batch(hooks)
                hooks.last_post_at = time.monotonic()
            outcome = _post(hooks, batch)  # outside the lock: the runner never waits on it
            with self._changed:
                self._settle(hooks, batch, outcome)

    def _settle(
        self, hooks: RunWebhooks, batch: list[_Waiting], outcome: webhook_http.Outcome
    ) -> None:
        if outcome.delivered:
            hooks.sent += 1
            hooks.failures = 0
            sent = {id(item) for item in batch}
            hooks.waiting = [item for item in hooks.waiting if id(item) not in sent]
        else:
            hooks.failures += 1
            logger.info(
                "intermediate webhook of task %s failed: %s",
                hooks.task_id, outcome.error or f"HTTP {outcome.status_code}",
            )  # fmt: skip
            if hooks.failures >= MAX_CONSECUTIVE_FAILURES:
                hooks.dropped += len(hooks.waiting)
                hooks.waiting = []
                hooks.suspended = True
        if hooks.closed and not hooks.waiting and hooks in self._runs:
            self._forget(hooks)
        self._changed.notify_all()  # a closing run may be waiting for this one


_the_sender: _Sender | None = None
_sender_lock = threading.Lock()


def _sender() -> _Sender:
    global _the_sender
    with _sender_lock:
        if _the_sender is None:
            _the_sender = _Sender()
        return _the_sender
