"""A callback worker `kill -9`'d mid-publish to a destination (README: Guarantees): the publish
is made again by another worker once the reconciler finds it lost, and recorded once.

The destination is a Redis Stream behind a relay the test controls, in front of the stack's own
Redis: `hold` accepts connections and never answers (the worker dies before anything reached
Redis: exactly once), `reply_lost` passes the XADD on but never its reply (the worker dies after
Redis took it: at least once, two entries with the same `webhook-id` for the consumer to
dedupe). After the kill the relay passes everything."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard.runtime.processes import DELIVERY_WORKER_CLASS
from tasks.delivery import destinations
from tasks.models import Destination, DestinationAttempt, Task
from tasks.plumbing.queueing import redis_client
from tests.conftest import api_submit, wait_for
from tests.stack import free_port
from tests.test_faults import kill_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]


class Relay:
    """A TCP relay to 127.0.0.1:`upstream_port`. Each connection keeps the mode it was accepted
    in: `hold` (reads, forwards nothing, answers nothing), `reply_lost` (forwards everything,
    and the replies until the first XADD, none after), `relay` (both ways)."""

    def __init__(self, upstream_port: int, mode: str) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.port = free_port()
        self.publishing = threading.Event()  # a held connection got data, or an XADD went by
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            mode = self.mode
            if mode == "hold":
                threading.Thread(target=self._hold, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets.append(upstream)
            swallow = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, swallow, mode),
                             daemon=True).start()  # fmt: skip
            threading.Thread(target=self._replies, args=(upstream, client, swallow),
                             daemon=True).start()  # fmt: skip

    def _hold(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(65536):
                self.publishing.set()

    def _pump(self, client: socket.socket, upstream: socket.socket, swallow, mode: str) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"XADD" in data.upper():
                    if mode == "reply_lost":
                        swallow.set()  # before Redis can answer it
                    self.publishing.set()
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.close()

    @staticmethod
    def _replies(upstream: socket.socket, client: socket.socket, swallow) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if not swallow.is_set():
                    client.sendall(data)
        with contextlib.suppress(OSError):
            client.close()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.parametrize(("mode", "copies"), [("hold", 1), ("reply_lost", 2)])
def test_a_worker_killed_mid_publish_is_published_again_and_recorded_once(
    stack, make_app, mode, copies
):
    relay = Relay(stack.redis_port, mode)
    try:
        # A long timeout: the publish is still waiting on the relay when its worker dies.
        app = make_app("echo", retry_schedule=[1], callback_timeout_seconds=30)
        stream = f"taskhook-kill-{uuid.uuid4().hex}"
        url = f"redis://127.0.0.1:{relay.port}/0?stream={stream}"
        destinations.set_destinations(application_id=app.application.pk, add=[url])
        Destination.objects.update(created_at=timezone.now() - timedelta(hours=1))
        stack.start_worker("tasks", ("tasks", "maintenance"))  # maintenance: the reconciler
        doomed = stack.start_worker("doomed", ("callbacks",), worker_class=DELIVERY_WORKER_CLASS)
        task_id = api_submit(app, {"inputs": {"q": "kill"}, "response_mode": "async"})
        assert relay.publishing.wait(30), doomed.output()[-3000:]
        kill_worker(doomed)
        assert not DestinationAttempt.objects.exists()
        assert len(redis_client().xrange(stream)) == copies - 1
        relay.mode = "relay"
        # The reconciler calls a first publish lost once the task finished a grace ago
        # (destinations.RESUME_GRACE): this moves the task's end back past it.
        Task.objects.filter(pk=task_id).update(
            finished_at=timezone.now() - destinations.RESUME_GRACE - timedelta(seconds=5)
        )
        stack.start_worker("survivor", ("callbacks",), worker_class=DELIVERY_WORKER_CLASS)
        stack.start_cron()
        attempt = wait_for(
            lambda: DestinationAttempt.objects.filter(task_id=task_id, delivered=True).first(),
            timeout=60,
        )
        entries = redis_client().xrange(stream)
        assert len(entries) == copies
        ids = {fields[b"webhook-id"] for _, fields in entries}
        assert len(ids) == 1  # the same message: a consumer dedupes on webhook-id
        assert {json.loads(fields[b"body"])["task_id"] for _, fields in entries} == {task_id}
        assert (attempt.number, attempt.trigger) == (1, "auto")
        time.sleep(6)  # three more reconciler passes (every 2 s): nothing more to do
        assert DestinationAttempt.objects.count() == 1
        assert len(redis_client().xrange(stream)) == copies
    finally:
        relay.close()
