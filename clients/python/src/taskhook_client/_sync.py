"""`Taskhook`: the blocking client (httpx.Client). It only drives the plans of `_core`."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import httpx

from taskhook_client import _core
from taskhook_client.models import (
    Batch,
    BatchAccepted,
    BatchResult,
    Event,
    Task,
    TaskAccepted,
)
from taskhook_client.webhooks import load_public_keys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class Taskhook:
    """A client for one API key.

    ```python
    with Taskhook("http://127.0.0.1:8000", api_key) as client:
        task = client.wait(client.submit(app_id, {"query": "hello"})["task_id"])
    ```

    Every method returns the API's JSON object as a dict (typed as the TypedDicts of
    `taskhook_client.models`) and raises `TaskhookError` (or a subclass: `InvalidRequest`,
    `NotFound`, ...) with the API's `code`, `message` and `field`. 429 and 503 answers are
    repeated after their `Retry-After`, at most `max_retries` times, as are connection errors
    where repeating cannot do the work twice.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = _core.DEFAULT_TIMEOUT,
        max_retries: int = _core.DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._http = http_client or httpx.Client(timeout=timeout)
        self._owns_http = http_client is None
        self._headers = _core.default_headers(api_key)

    # --- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, request: _core.Request) -> _core.Response:
        response = self._http.request(
            request.method,
            self.base_url + request.path,
            params=request.params,
            json=request.json,
            headers=self._headers | request.headers,
            timeout=request.timeout if request.timeout is not None else self.timeout,
        )
        return _core.Response(response.status_code, response.headers, response.content)

    def _iterate[T](self, plan: _core.Plan[T]) -> Generator[Any, None, T]:
        """Run a plan: send its requests, sleep its sleeps, yield its items."""
        outcome: _core.Response | None = None
        failure: httpx.TransportError | None = None
        while True:
            try:
                step = plan.throw(failure) if failure is not None else plan.send(outcome)
            except StopIteration as stop:
                return cast(T, stop.value)
            outcome, failure = None, None
            if isinstance(step, _core.Sleep):
                time.sleep(step.seconds)
            elif isinstance(step, _core.Item):
                yield step.value
            else:
                try:
                    outcome = self._send(step)
                except httpx.TransportError as exc:
                    failure = exc

    def _run[T](self, plan: _core.Plan[T]) -> T:
        steps = self._iterate(plan)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return cast(T, stop.value)

    def _call(self, request: _core.Request) -> Any:
        return self._run(_core.json_call(request, self.max_retries))

    # --- tasks -----------------------------------------------------------------------------

    def submit(
        self,
        app_id: str,
        inputs: Mapping[str, Any],
        *,
        callback_url: str | None = None,
        callback_events: Iterable[str] | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
        deadline: float | timedelta | None = None,
        user: str | None = None,
    ) -> TaskAccepted:
        """Submit a task (`response_mode: "async"`): its id, `poll_url` and `stream_url` at once.
        `deadline` (seconds or a timedelta) is the API's `deadline_seconds`."""
        request = _core.submit_request(
            app_id, inputs, callback_url=callback_url, callback_events=callback_events,
            priority=priority, idempotency_key=idempotency_key, deadline=deadline, user=user,
        )  # fmt: skip
        return cast(TaskAccepted, self._call(request))

    def run(
        self,
        app_id: str,
        inputs: Mapping[str, Any],
        *,
        timeout: float | None = None,
        callback_url: str | None = None,
        callback_events: Iterable[str] | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
        deadline: float | timedelta | None = None,
        user: str | None = None,
    ) -> Task:
        """Submit and wait for the finished task: the server holds the answer with `Prefer:
        wait` (up to the application's blocking timeout), then `wait()` polls the rest of
        `timeout`. Raises WaitTimeout if the task is still unfinished then."""
        request = _core.submit_request(
            app_id, inputs, callback_url=callback_url, callback_events=callback_events,
            priority=priority, idempotency_key=idempotency_key, deadline=deadline, user=user,
            prefer_wait=_core.prefer_wait_seconds(timeout), timeout=self.timeout,
        )  # fmt: skip
        return cast(Task, self._run(_core.run_plan(request, timeout, self.max_retries)))

    def get(self, task_id: str) -> Task:
        """Poll a task."""
        return cast(Task, self._call(_core.get_request(task_id)))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Poll until the task has finished (succeeded, failed or cancelled), as often as the
        server's Retry-After says; WaitTimeout after `timeout` seconds (None: no limit)."""
        return cast(Task, self._run(_core.wait_plan(task_id, timeout, self.max_retries)))

    def cancel(self, task_id: str) -> Task:
        """Cancel a pending or running task; `Conflict` (`task_finished`) if it had finished."""
        return cast(Task, self._call(_core.cancel_request(task_id)))

    def stream(self, task_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The task's live events, up to and including `task.finished`. A dropped connection is
        resumed with `Last-Event-ID`, so no event is missed or repeated. `last_event_id` starts
        after that event (`"0"`: every event kept)."""
        return self._events(_core.task_events_path(task_id), "task.finished", last_event_id)

    # --- batches ---------------------------------------------------------------------------

    def submit_batch(
        self,
        app_id: str,
        items: Iterable[Mapping[str, Any]],
        *,
        callback_url: str | None = None,
        callback_events: Iterable[str] | None = None,
        priority: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> BatchAccepted:
        """Submit many tasks at once; each item is `{"inputs": {...}, ...}` (`BatchItem`)."""
        request = _core.submit_batch_request(
            app_id, items, callback_url=callback_url, callback_events=callback_events,
            priority=priority, metadata=metadata, idempotency_key=idempotency_key,
        )  # fmt: skip
        return cast(BatchAccepted, self._call(request))

    def get_batch(self, batch_id: str) -> Batch:
        return cast(Batch, self._call(_core.get_batch_request(batch_id)))

    def cancel_batch(self, batch_id: str) -> Batch:
        return cast(Batch, self._call(_core.cancel_batch_request(batch_id)))

    def batch_results(
        self,
        batch_id: str,
        *,
        after: int = -1,
        limit: int | None = None,
        follow: bool = True,
        poll_seconds: float = _core.DEFAULT_POLL_SECONDS,
    ) -> Iterator[BatchResult]:
        """The finished items from index `after + 1` on, in index order, across pages. With
        `follow` it waits for unfinished items (polling every `poll_seconds`) until every item
        has been read; without, it stops at the first unfinished one."""
        return self._iterate(
            _core.batch_results_plan(
                batch_id,
                after=after,
                limit=limit,
                follow=follow,
                poll_seconds=poll_seconds,
                max_retries=self.max_retries,
            )
        )

    def stream_batch(self, batch_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The batch's `batch.progress` events, up to and including `batch.finished`."""
        return self._events(_core.batch_events_path(batch_id), "batch.finished", last_event_id)

    # --- callbacks -------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The server's JWKS (every application's Ed25519 public keys); no API key needed."""
        return cast(dict[str, Any], self._call(_core.jwks_request()))

    def public_keys(self, app_id: str) -> list[Ed25519PublicKey]:
        """The Ed25519 public keys of one application, for `verify_webhook(public_keys=...)`."""
        return load_public_keys(self.jwks(), app_id)

    # --- event streams ---------------------------------------------------------------------

    def _events(self, path: str, final: str, last_event_id: str | None) -> Iterator[Event]:
        state = _core.StreamState(final, self.max_retries, last_event_id)
        while True:
            request = _core.events_request(path, state.last_event_id)
            failure: httpx.TransportError | None = None
            try:
                with self._http.stream(
                    "GET", self.base_url + request.path, headers=self._headers | request.headers,
                    timeout=_core.stream_timeout(self.timeout),
                ) as response:  # fmt: skip
                    content = response.read() if response.status_code >= 400 else b""
                    opened = _core.Response(response.status_code, response.headers, content)
                    if state.opened(opened):
                        decoder = state.decoder()
                        for line in response.iter_lines():
                            event = decoder.feed(line)
                            state.received(decoder, event)
                            if event is not None:
                                yield event
                            if state.done:
                                return
            except httpx.TransportError as exc:
                failure = exc
            if state.done:
                return
            time.sleep(state.next_delay(failure))
