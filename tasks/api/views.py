"""The client API (README: API). Views parse, authenticate and answer; services do the work."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.handlers.wsgi import WSGIRequest
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from tasks import credentials, jsonsafety
from tasks.api import blocking, prefer, ratelimit
from tasks.batches import control as batch_control
from tasks.batches import follow as batch_follow
from tasks.batches import ingest as batch_ingest
from tasks.events import tokens
from tasks.idempotency import IdempotencyConflict
from tasks.models import ApiKey, Batch, IdempotencyRecord, Task
from tasks.plumbing import bursts
from tasks.plumbing.queueing import wait_for_finish
from tasks.presenters import (
    accepted_body,
    batch_body,
    batch_detail_body,
    batch_result_line,
    poll_url,
    removed_task_body,
    retry_after_seconds,
    stream_url,
    task_body,
)
from tasks.scheduling import estimates
from tasks.selectors.polling import task_for_client
from tasks.services import cancel_task
from tasks.statuses import FINISHED
from tasks.submission import (
    ValidationFailed,
    parse_submit_body,
    submit_task,
    validate_idempotency_key,
)

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers=None
) -> JsonResponse:
    response = JsonResponse(
        {"error": {"code": code, "message": message, "field": field}}, status=status
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def api_view(*methods: str) -> Callable:
    """JSON-only endpoint: method check, ApiError -> error body, and never an HTML 500."""

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs) -> JsonResponse:
            if request.method not in methods:
                return error_response(
                    405,
                    "method_not_allowed",
                    f"{request.method} is not allowed here; use {', '.join(methods)}.",
                    headers={"Allow": ", ".join(methods)},
                )
            try:
                # Answers carry absolute URLs built from Host: refuse an unknown one before
                # anything is stored, not after the task was committed.
                request.get_host()
            except DisallowedHost:
                return error_response(
                    400, "invalid_request", "The Host header names no host served here.", "Host"
                )
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
            except (OperationalError, InterfaceError):
                # The database went away (restart, failover): nothing was accepted, say when to
                # try again. Django drops the broken connection at the end of this request.
                logger.warning("database unavailable in %s", request.path, exc_info=True)
                return error_response(
                    503,
                    "unavailable",
                    "The database is unavailable; retry shortly.",
                    headers={"Retry-After": "1"},
                )
            except Exception:
                logger.exception("unhandled error in %s", request.path)
                return error_response(500, "internal_error", "An internal error occurred.")

        return wrapper

    return decorate


def authenticate(request: HttpRequest) -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, raw_key = header.partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise ApiError(401, "unauthorized", "Send the API key as 'Authorization: Bearer <key>'.")
    key = credentials.authenticate(raw_key.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "The API key is missing, wrong or revoked.")
    return key


def _not_found(what: str = "task") -> ApiError:
    return ApiError(404, "not_found", f"No such {what}.")


def _parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise _not_found(what) from None


def _read_json(request: HttpRequest, *, limit: int | None = None) -> object:
    """The JSON body, at most `limit` bytes (MAX_BODY_BYTES by default). A larger limit than
    Django's DATA_UPLOAD_MAX_MEMORY_SIZE (a batch) reads the stream itself."""
    limit = limit or settings.MAX_BODY_BYTES
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    try:
        if _is_chunked(request):
            raw = _chunked_body(request, limit)
        elif limit > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raw = request.read(limit + 1)
        else:
            raw = request.body
    except RequestDataTooBig:
        raise _too_large(limit) from None
    if len(raw) > limit:
        raise _too_large(limit)
    try:
        return jsonsafety.loads(raw)
    except jsonsafety.UnstorableJson as exc:
        raise ApiError(400, "invalid_request", f"The body is refused: {exc.reason}.") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_request", f"The body is not valid JSON: {exc}") from None


def _is_chunked(request: HttpRequest) -> bool:
    return not request.META.get("CONTENT_LENGTH") and "chunked" in (
        request.META.get("HTTP_TRANSFER_ENCODING", "").lower()
    )


def _chunked_body(request: HttpRequest, limit: int) -> bytes:
    """A body sent with Transfer-Encoding: chunked (no Content-Length): Django reads such a body
    as empty, the server (gunicorn) has already de-chunked it. Read one byte past the limit to
    tell a body that is too large."""
    assert isinstance(request, WSGIRequest)  # the API is served by WSGI only (runtime.handlers)
    return request.environ["wsgi.input"].read(limit + 1)


BODY_BLOCK = 64 * 1024  # bytes read at a time from a streamed body


def _body_lines(request: HttpRequest, *, limit: int) -> Iterator[bytes]:
    """The body a line at a time (chunked or not), at most `limit` bytes in all and a line at
    most MAX_BODY_BYTES (a single submit's bound), so the body is never held whole. Read in
    blocks and split here: the web process's ASGI bridge (a2wsgi) answers a sized readline
    with what it has buffered so far, an empty line before the first bytes arrive."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    if _is_chunked(request):
        assert isinstance(request, WSGIRequest)  # as in _chunked_body
        stream = request.environ["wsgi.input"]
    else:
        stream = request
    line_limit = settings.MAX_BODY_BYTES
    pending = bytearray()  # the line being read, and what follows it in the last block
    scanned = read = number = 0
    while True:
        block = stream.read(min(BODY_BLOCK, limit - read + 1))
        read += len(block)
        if read > limit:
            raise _too_large(limit)
        pending += block
        start = 0
        while (end := pending.find(b"\n", scanned)) != -1:
            number += 1
            if end + 1 - start > line_limit:
                raise _line_too_large(number, line_limit)
            yield bytes(pending[start : end + 1])
            start = scanned = end + 1
        del pending[:start]
        scanned = len(pending)
        if len(pending) > line_limit:
            raise _line_too_large(number + 1, line_limit)
        if not block:
            if pending:
                yield bytes(pending)
            return


def _line_too_large(number: int, line_limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"Line {number} is larger than {line_limit} bytes (MAX_BODY_BYTES).",
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"The body is larger than {limit} bytes.")


def _with_retry_after(
    response: JsonResponse, task: Task, queue: dict[str, Any] | None = None
) -> JsonResponse:
    """While the task waits, its ETA within 1-5 s; else 1 s growing to 5 s with its age."""
    if not task.is_finished:
        seconds = estimates.retry_after(queue) or retry_after_seconds(task)
        response["Retry-After"] = str(seconds)
    return response


def _check_rate(key: ApiKey) -> None:
    try:
        ratelimit.check_submit(key=key)
    except ratelimit.RateLimited as exc:
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests for this API key; retry after {exc.retry_after} s.",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None


def _idempotency_conflict() -> ApiError:
    return ApiError(
        409,
        "idempotency_conflict",
        "This Idempotency-Key was used with a different request body.",
        "Idempotency-Key",
    )


def _submitting_key(request: HttpRequest, app_id: str) -> ApiKey:
    """The API key of a submit to `app_id` (a task or a batch), within its rate limit."""
    key = authenticate(request)
    if str(key.application_id) != str(_parse_uuid(app_id, "application")):
        raise _not_found("application")
    _check_rate(key)
    return key


@api_view("POST")
def generate(request: HttpRequest, app_id: str) -> JsonResponse:
    key = _submitting_key(request, app_id)
    application = key.application
    try:
        submit = parse_submit_body(
            _read_json(request), cancel_after=request.headers.get("Cancel-After")
        )
        idempotency_key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    except ValidationFailed as exc:
        raise ApiError(400, "invalid_request", exc.message, exc.field) from None
    timeout = application.blocking_timeout_seconds or settings.BLOCKING_TIMEOUT
    # `Prefer: wait=N` asks for a blocking answer within N s, whatever the response_mode says.
    wait = prefer.applied_wait(request.headers.get("Prefer"), cap=timeout)
    if wait is not None:
        submit = dataclasses.replace(submit, response_mode="blocking")
    try:
        task, _created = submit_task(
            application=application, request=submit, idempotency_key=idempotency_key
        )
    except IdempotencyConflict:
        raise _idempotency_conflict() from None
    if isinstance(task, IdempotencyRecord):
        # The first task already ran and retention removed it: its id again, nothing re-run.
        return JsonResponse(removed_task_body(request, task))
    task.application = application

    if submit.response_mode == "async":
        return JsonResponse(accepted_body(request, task))

    with blocking.wait_slot(key_id=key.pk) as may_wait:
        if may_wait and wait != 0:
            wait_for_finish(
                task.id,
                timeout=timeout if wait is None else wait,
                is_finished=lambda: Task.objects.filter(pk=task.id, status__in=FINISHED).exists(),
            )
    task.refresh_from_db()
    # Past the blocking caps nothing was waited for: the preference applied is then wait=0.
    applied = {} if wait is None else {"Preference-Applied": f"wait={wait if may_wait else 0}"}
    if task.is_finished:
        return JsonResponse(task_body(task), headers=applied)
    queue = estimates.for_task(task)
    body = task_body(task, queue=queue) | {
        "poll_url": poll_url(request, task),
        "stream_url": stream_url(request, task),
    }
    return _with_retry_after(JsonResponse(body, status=202, headers=applied), task, queue)


def _task_for_key(request: HttpRequest, task_id: str) -> Task:
    key = authenticate(request)
    task = task_for_client(task_id=_parse_uuid(task_id, "task"), application_id=key.application_id)
    if task is None:
        raise _not_found()
    return task


def _task_for_reader(request: HttpRequest, task_id: str) -> Task:
    """The API key, or a stream token bound to this task (`?token=`, tasks.events.tokens)."""
    token = request.GET.get("token")
    if token is None or request.headers.get("Authorization", "").strip():
        return _task_for_key(request, task_id)
    task_uuid = _parse_uuid(task_id, "task")
    if not tokens.is_valid(task_uuid, token):
        raise ApiError(401, "unauthorized", tokens.REFUSED)
    task = task_for_client(task_id=task_uuid, application_id=None)
    if task is None:
        raise _not_found()
    return task


@api_view("GET")
def task_detail(request: HttpRequest, task_id: str) -> JsonResponse:
    task = _task_for_reader(request, task_id)
    queue = estimates.for_task(task)
    return _with_retry_after(JsonResponse(task_body(task, queue=queue)), task, queue)


@api_view("POST")
def task_cancel(request: HttpRequest, task_id: str) -> JsonResponse:
    task = _task_for_key(request, task_id)
    result = cancel_task(task_id=task.id)
    if not result.cancelled:
        raise ApiError(409, "task_finished", f"The task already finished ({result.task.status}).")
    return JsonResponse(task_body(result.task))


@api_view("GET")
def events_need_asgi(request: HttpRequest, **ids: str) -> JsonResponse:
    raise ApiError(
        501,
        "not_implemented",
        "Event streams are served by the ASGI web process (dashboard.runtime.asgi); this server "
        "runs the WSGI application only.",
    )


@api_view("POST")
@bursts.during  # decoding, checking and storing thousands of items: see tasks.plumbing.bursts
def batch_submit(request: HttpRequest, app_id: str) -> JsonResponse:
    key = _submitting_key(request, app_id)
    application = key.application
    hashed = bool(request.headers.get("Idempotency-Key"))  # only a repeat compares bodies
    try:
        if request.content_type == "application/x-ndjson":
            submit = batch_ingest.parse_ndjson_batch(
                _body_lines(request, limit=settings.BATCH_NDJSON_MAX_BODY_BYTES),
                query=dict(request.GET.lists()),
                hashed=hashed,
            )
        elif request.content_type == "application/json":
            given = [name for name in batch_ingest.NDJSON_BATCH_FIELDS if name in request.GET]
            if given:  # the JSON form would ignore them without a word
                raise ApiError(
                    400,
                    "invalid_request",
                    "Query parameters set an NDJSON batch's fields; a JSON batch has them in "
                    "its body.",
                    given[0],
                )
            submit = batch_ingest.parse_batch_body(
                _read_json(request, limit=settings.BATCH_MAX_BODY_BYTES), hashed=hashed
            )
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "Send the batch as JSON (Content-Type: application/json) or one item per line "
                "(Content-Type: application/x-ndjson).",
            )
        idempotency_key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    except ValidationFailed as exc:
        raise ApiError(400, "invalid_request", exc.message, exc.field) from None
    try:
        batch, _created = batch_ingest.submit_batch(
            application=application, request=submit, idempotency_key=idempotency_key,
            base_url=request.build_absolute_uri("/"),
        )  # fmt: skip
    except IdempotencyConflict:
        raise _idempotency_conflict() from None
    except batch_ingest.BatchInProgress:
        raise ApiError(
            409,
            "idempotency_conflict",
            "A batch with this Idempotency-Key is still being stored; retry in a few seconds.",
            "Idempotency-Key",
            headers={"Retry-After": "2"},
        ) from None
    except batch_ingest.ItemKeyTaken as exc:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"items[{exc.index}]: this idempotency_key already names a task.",
            f"items[{exc.index}].idempotency_key",
        ) from None
    batch.application = application
    return JsonResponse(batch_body(request, batch, counts=batch_follow.progress(batch).counts))


def _batch_for_key(request: HttpRequest, batch_id: str) -> Batch:
    key = authenticate(request)
    batch = (
        Batch.objects.select_related("application")
        .filter(pk=_parse_uuid(batch_id, "batch"), application_id=key.application_id)
        .first()
    )
    if batch is None:
        raise _not_found("batch")
    return batch


def _batch_detail(request: HttpRequest, batch: Batch) -> JsonResponse:
    progress = batch_follow.progress(batch)
    body = batch_detail_body(request, batch, counts=progress.counts, progress=progress.percent)
    return JsonResponse(body)


@api_view("GET")
def batch_detail(request: HttpRequest, batch_id: str) -> JsonResponse:
    return _batch_detail(request, _batch_for_key(request, batch_id))


@api_view("GET")
def batch_results(request: HttpRequest, batch_id: str) -> StreamingHttpResponse:
    batch = _batch_for_key(request, batch_id)
    unknown = next((name for name in request.GET if name not in ("after", "limit")), None)
    if unknown is not None:  # a misspelt cursor must not silently restart at the first item
        raise ApiError(400, "invalid_request", "Only after and limit are accepted here.", unknown)
    after = _int_param(request, "after", default=-1, low=-1, high=batch_ingest.MAX_NDJSON_ITEMS)
    limit = _int_param(
        request,
        "limit",
        default=batch_follow.RESULTS_LIMIT,
        low=1,
        high=batch_follow.RESULTS_MAX_LIMIT,
    )
    page = batch_follow.results(batch=batch, after=after, limit=limit)
    lines = (
        json.dumps(batch_result_line(*row), separators=(",", ":")).encode() + b"\n"
        for row in page.rows
    )
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
    if page.next_after is not None:
        path = reverse("api:batch-results", args=[batch.id])
        following = request.build_absolute_uri(f"{path}?after={page.next_after}&limit={limit}")
        response["Link"] = f'<{following}>; rel="next"'
    return response


def _int_param(request: HttpRequest, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.GET.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(
            400, "invalid_request", f"{name} must be an integer from {low} to {high}.", name
        )
    return value


@api_view("POST")
def batch_cancel(request: HttpRequest, batch_id: str) -> JsonResponse:
    batch = _batch_for_key(request, batch_id)
    batch_control.cancel_batch(batch=batch)
    return _batch_detail(request, batch)


@api_view("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    raise ApiError(404, "not_found", f"No API endpoint at {request.path}.")
