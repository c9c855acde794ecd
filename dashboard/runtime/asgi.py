"""The ASGI application the web process serves (gunicorn with uvicorn workers).

One base URL for everything: `/api/tasks/{id}/events` and `/api/batches/{id}/events` go to the
native async event streams (tasks.api.events, tasks.api.batch_events), where an open stream
costs a coroutine; every other path goes to the same
WSGI handler as before (dashboard.runtime.handlers.RoutingHandler) on a thread pool of
WEB_THREADS threads (a2wsgi), so the API, the dashboard and their middleware run unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
django.setup(set_prefix=False)

from a2wsgi import WSGIMiddleware  # noqa: E402 (needs the apps loaded)
from django.conf import settings  # noqa: E402

from dashboard.runtime.handlers import RoutingHandler  # noqa: E402
from tasks.api import batch_events, events  # noqa: E402

wsgi = WSGIMiddleware(RoutingHandler(), workers=settings.WEB_THREADS)  # type: ignore[arg-type]


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http" and events.PATH.match(scope["path"]):
        await events.application(scope, receive, send)
        return
    if scope["type"] == "http" and batch_events.PATH.match(scope["path"]):
        await batch_events.application(scope, receive, send)
        return
    await wsgi(scope, receive, send)  # type: ignore[arg-type]
