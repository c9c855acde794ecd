"""Exceptions: every API error carries the server's `code`, `message` and `field`."""

from __future__ import annotations

from typing import Any


class TaskhookError(Exception):
    """An error answer of the API (`{"error": {"code", "message", "field"}}`), or a failure to
    reach it (`status` None).

    `retry_after` is the answer's `Retry-After` in seconds, when it had one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        status: int | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"field={self.field!r}, status={self.status!r})"
        )


class InvalidRequest(TaskhookError):
    """400 `invalid_request`: `field` names the part of the request at fault."""


class Unauthorized(TaskhookError):
    """401 `unauthorized`: no, a wrong, expired or revoked API key."""


class NotFound(TaskhookError):
    """404 `not_found`: unknown or expired task, batch or application (or another key's)."""


class Conflict(TaskhookError):
    """409: `idempotency_conflict` or `task_finished`."""


class RateLimited(TaskhookError):
    """429 `rate_limited`, still refused after the client's retries."""


class Unavailable(TaskhookError):
    """503 `unavailable`, still refused after the client's retries."""


class ConnectionFailed(TaskhookError):
    """The server could not be reached or the connection broke (no HTTP answer)."""


class WaitTimeout(TaskhookError, TimeoutError):
    """`wait()` ran out of time; `task` is the last poll of the (still unfinished) task."""

    def __init__(self, message: str, task: dict[str, Any]) -> None:
        super().__init__("wait_timeout", message)
        self.task = task


BY_STATUS: dict[int, type[TaskhookError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: Unavailable,
}


class WebhookVerificationError(ValueError):
    """A callback whose signature, timestamp or headers do not check out: answer it 401."""
