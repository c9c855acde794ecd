"""The WSGI callable gunicorn serves: the JSON API through a handler with settings.API_MIDDLEWARE,
everything else (dashboard, admin, health, metrics, static) through Django's usual handler."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from django.core.handlers.base import BaseHandler
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")

API_PREFIX = "/api/"


def with_api_middleware[H: BaseHandler](handler_class: type[H], *args: Any, **kwargs: Any) -> H:
    """A Django handler (the WSGI one, or the test client's) whose middleware chain is built
    from settings.API_MIDDLEWARE."""
    from django.conf import settings
    from django.test.utils import override_settings

    # BaseHandler.load_middleware reads settings.MIDDLEWARE, and only while the chain is built.
    with override_settings(MIDDLEWARE=settings.API_MIDDLEWARE):
        handler = handler_class(*args, **kwargs)
        if handler._middleware_chain is None:  # the test client's handler builds it lazily
            handler.load_middleware()
    return handler


def is_api(environ: dict[str, Any]) -> bool:
    return environ.get("PATH_INFO", "").startswith(API_PREFIX)


site = get_wsgi_application()
api = with_api_middleware(type(site))


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    return (api if is_api(environ) else site)(environ, start_response)
