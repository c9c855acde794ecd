"""One callback POST over HTTP: to a checked address, bounded as a whole, whatever comes back.

- The connection goes to an address `ssrf.checked_target` checked, never to the name, while TLS
  SNI, the certificate check and `Host` stay on the name; pools are keyed by address and name,
  so a kept-alive connection is reused only for the address it was opened to.
- The callback timeout bounds the whole attempt (connect, send, wait, read): urllib3's timeouts
  apply per socket operation, so a receiver dripping a byte a second would hold a delivery
  thread forever. A watchdog thread shuts the socket of an attempt that passed its deadline.
- Connecting has its own shorter timeout (CALLBACK_CONNECT_TIMEOUT), so an address that
  swallows SYNs costs seconds, not the whole callback timeout.
- urllib3 rather than httpx: less client CPU per delivery (docs/benchmarks.md). Redirects are
  never followed, nothing is retried inside an attempt (the retry policy decides), and no proxy
  is used (it would resolve the host out of the guard's sight).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import urllib3
from django.conf import settings
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from tasks import jsonsafety
from tasks.delivery import retry_policy
from tasks.delivery.ssrf import Target

EXCERPT_BYTES = 2048


@dataclass
class Outcome:
    status_code: int | None = None
    excerpt: str = ""
    error: str = ""
    retry_after: float | None = None
    duration_ms: int = 0

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# --- the whole-attempt deadline ------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.connection: HTTPConnection | None = None
        self.expired = False

    def remaining(self) -> float:
        return max(0.01, self.at - time.monotonic())

    def expire(self) -> None:
        self.expired = True
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read in the other thread returns


class _Watchdog:
    """One thread for every attempt in the process, checking deadlines a few times a second."""

    TICK_SECONDS = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, _Deadline] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: _Deadline) -> int:
        with self._lock:
            handle = next(self._ids)
            self._active[handle] = deadline
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="callback-deadlines", daemon=True
                )
                self._thread.start()
        return handle

    def forget(self, handle: int) -> None:
        with self._lock:
            self._active.pop(handle, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                due = [d for d in self._active.values() if d.at <= now and not d.expired]
            for deadline in due:
                deadline.expire()


_watchdog = _Watchdog()
_current = threading.local()  # the attempt this delivery thread is making


# The mixin extends urllib3's connections: type-check it as one (at runtime it mixes in before one).
if TYPE_CHECKING:
    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


class _DeadlineConnectionMixin(_ConnectionBase):
    """Tells the running attempt which connection (socket) it is using, new or kept-alive."""

    def connect(self) -> None:
        _register(self)
        super().connect()

    def request(self, *args, **kwargs):
        _register(self)
        return super().request(*args, **kwargs)


def _register(connection: HTTPConnection) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.connection = connection


class _HTTPConnection(_DeadlineConnectionMixin, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnectionMixin, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


@functools.cache
def pool_manager() -> urllib3.PoolManager:
    """One per worker process: keep-alive to receivers, keyed by (scheme, address, port, name)."""
    manager = urllib3.PoolManager(
        num_pools=200,
        # One kept connection per delivery thread and receiver; more are opened when needed.
        maxsize=max(settings.CALLBACK_CONCURRENCY, 1),
        retries=False,
        # Receivers behind a private CA: its bundle instead of the system's.
        **({"ca_certs": settings.CALLBACK_CA_BUNDLE} if settings.CALLBACK_CA_BUNDLE else {}),
    )
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


# --- one POST ------------------------------------------------------------------------------


def post(*, target: Target, body: bytes, headers: dict[str, str], timeout: float) -> Outcome:
    """POST `body` to the target; never raises for anything the receiver or network does."""
    url = target.url
    deadline = _Deadline(timeout)
    handle = _watchdog.watch(deadline)
    _current.deadline = deadline
    started = time.monotonic()
    outcome = Outcome()
    try:
        for index, address in enumerate(target.addresses):
            outcome = _post_to(address, url, body, headers | {"Host": url.host_header}, deadline)
            last = index == len(target.addresses) - 1
            if last or deadline.expired or not outcome.error.startswith("could not connect"):
                break  # only a refused or unreachable address moves on to the next one
    except Exception as exc:  # a bug or an odd library error must still end as an attempt
        outcome = Outcome(error=f"{type(exc).__name__}: {exc}")
    finally:
        _current.deadline = None
        _watchdog.forget(handle)
    if deadline.expired:
        if outcome.status_code is None:
            outcome.error = f"timed out after {timeout:g} s"
        else:  # the status line came in time; the rest of the answer did not
            outcome.error = f"{outcome.error}; answer cut off after {timeout:g} s".lstrip("; ")
    outcome.duration_ms = int((time.monotonic() - started) * 1000)
    outcome.excerpt = jsonsafety.clean_text(outcome.excerpt)
    outcome.error = jsonsafety.clean_text(outcome.error)[:2000]
    return outcome


def _post_to(
    address: str, url, body: bytes, headers: dict[str, str], deadline: _Deadline
) -> Outcome:
    tls = {"server_hostname": url.host, "assert_hostname": url.host}
    pool = pool_manager().connection_from_host(
        address,
        port=url.port,
        scheme=url.scheme,
        pool_kwargs=tls if url.scheme == "https" else None,
    )
    remaining = deadline.remaining()
    outcome = Outcome()
    try:
        response = pool.urlopen(
            "POST",
            url.request_uri,
            body=body,
            headers=headers,
            timeout=urllib3.Timeout(
                connect=min(settings.CALLBACK_CONNECT_TIMEOUT, remaining), read=remaining
            ),
            redirect=False,
            retries=False,
            preload_content=False,
            assert_same_host=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        outcome.error = _transport_error(exc, deadline)
        return outcome
    if deadline.expired:  # the head was cut off: http.client parses what it had, not an answer
        response.close()
        response.release_conn()
        return outcome
    outcome.status_code = response.status
    outcome.retry_after = retry_policy.parse_retry_after(response.headers.get("Retry-After"))
    location = response.get_redirect_location()
    try:
        outcome.excerpt = _read_excerpt(response)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        outcome.error = f"{_transport_error(exc, deadline)} while reading the answer"
    else:
        if location is not False:
            outcome.error = f"redirect not followed (HTTP {response.status} to {location})"
        elif not outcome.delivered:
            outcome.error = f"receiver answered HTTP {response.status}"
    return outcome


def _read_excerpt(response: urllib3.BaseHTTPResponse) -> str:
    """The first EXCERPT_BYTES of the answer, whatever its bytes. A longer answer is not read to
    its end: its connection is closed instead of kept (the pool opens a fresh one)."""
    try:
        excerpt = response.read(EXCERPT_BYTES)
    finally:
        if not response.closed:  # not read to the end, or failed mid-way
            response.close()
        response.release_conn()
    return excerpt.decode("utf-8", errors="replace")


def _transport_error(exc: Exception, deadline: _Deadline) -> str:
    """What an operator reads in the attempt row when no complete HTTP answer came."""
    # urllib3 makes NewConnectionError a kind of ConnectTimeoutError: test it first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return f"could not connect: {exc.__context__ or exc}"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"could not connect: no answer within {settings.CALLBACK_CONNECT_TIMEOUT:g} s"
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return f"timed out after {deadline.seconds:g} s"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        reason = exc.args[-1] if exc.args else exc
        return f"not an HTTP answer or connection broken: {reason}"
    return f"{type(exc).__name__}: {exc}"
