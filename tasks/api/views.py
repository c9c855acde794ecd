"""The client API (README: API). Views parse, authenticate and answer; services do the work."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.core.handlers.wsgi import WSGIRequest
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from tasks import credentials, jsonsafety
from tasks.api import blocking, prefer, ratelimit
from tasks.events import tokens
from tasks.idempotency import IdempotencyConflict
from tasks.models import ApiKey, IdempotencyRecord, Task
from tasks.plumbing.queueing import wait_for_finish
from tasks.presenters import (
    accepted_body,
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


def _read_json(request: HttpRequest) -> object:
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > settings.MAX_BODY_BYTES:
        raise _too_large()
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    try:
        raw = _chunked_body(request) if _is_chunked(request) else request.body
    except RequestDataTooBig:
        raise _too_large() from None
    if len(raw) > settings.MAX_BODY_BYTES:
        raise _too_large()
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


def _chunked_body(request: HttpRequest) -> bytes:
    """A body sent with Transfer-Encoding: chunked (no Content-Length): Django reads such a body
    as empty, the server (gunicorn) has already de-chunked it. Read one byte past the limit to
    tell a body that is too large."""
    assert isinstance(request, WSGIRequest)  # the API is served by WSGI only (runtime.handlers)
    return request.environ["wsgi.input"].read(settings.MAX_BODY_BYTES + 1)


def _too_large() -> ApiError:
    return ApiError(
        413, "payload_too_large", f"The body is larger than {settings.MAX_BODY_BYTES} bytes."
    )


def _with_retry_after(
    response: JsonResponse, task: Task, queue: dict[str, Any] | None = None
) -> JsonResponse:
    """While the task waits, its ETA within 1-5 s; else 1 s growing to 5 s with its age."""
    if not task.is_finished:
        seconds = estimates.retry_after(queue) or retry_after_seconds(task)
        response["Retry-After"] = str(seconds)
    return response


@api_view("POST")
def generate(request: HttpRequest, app_id: str) -> JsonResponse:
    key = authenticate(request)
    if str(key.application_id) != str(_parse_uuid(app_id, "application")):
        raise _not_found("application")
    application = key.application
    try:
        ratelimit.check_submit(key=key)
    except ratelimit.RateLimited as exc:
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests for this API key; retry after {exc.retry_after} s.",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
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
        raise ApiError(
            409,
            "idempotency_conflict",
            "This Idempotency-Key was used with a different request body.",
            "Idempotency-Key",
        ) from None
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
def task_events_needs_asgi(request: HttpRequest, task_id: str) -> JsonResponse:
    raise ApiError(
        501,
        "not_implemented",
        "Event streams are served by the ASGI web process (dashboard.runtime.asgi); this server "
        "runs the WSGI application only.",
    )


@api_view("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    raise ApiError(404, "not_found", f"No API endpoint at {request.path}.")
