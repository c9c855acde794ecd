"""The API's lean middleware chain, as an explicit Django handler.

An API request authenticates by key and sets no cookie, so sessions, CSRF, auth, messages,
framing, CSP and htmx do nothing for it (docs/benchmarks.md measures what skipping them saves).
`ApiHandler` is Django's WSGI handler with its chain built from settings.API_MIDDLEWARE instead
of settings.MIDDLEWARE; `RoutingHandler` sends /api/ to it and everything else to Django's own.
The test client routes the same way (tests/conftest.py), so API tests run the production chain.

`load_middleware` below is a synchronous copy of Django's BaseHandler.load_middleware for a
different list: it fills the handler's private middleware attributes, a seam listed in
dashboard/runtime/seams.py and checked against the installed Django by tests/unit/test_seams.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import convert_exception_to_response
from django.core.handlers.wsgi import WSGIHandler
from django.utils.module_loading import import_string

API_PREFIX = "/api/"


def is_api(environ: dict[str, Any]) -> bool:
    return environ.get("PATH_INFO", "").startswith(API_PREFIX)


class ApiMiddlewareMixin(BaseHandler):
    """A handler whose middleware chain is settings.API_MIDDLEWARE (synchronous middleware
    only: the API is served by WSGI)."""

    def load_middleware(self, is_async: bool = False) -> None:
        if is_async:
            raise ImproperlyConfigured("the API handler is synchronous (WSGI)")
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []
        # Private BaseHandler method (a checked seam, see above), not in django-stubs.
        handler = convert_exception_to_response(self._get_response)  # type: ignore[attr-defined]
        for path in reversed(settings.API_MIDDLEWARE):
            try:
                instance = import_string(path)(handler)
            except MiddlewareNotUsed:
                continue
            if instance is None:
                raise ImproperlyConfigured(f"Middleware factory {path} returned None.")
            if hasattr(instance, "process_view"):
                self._view_middleware.insert(0, instance.process_view)
            if hasattr(instance, "process_template_response"):
                self._template_response_middleware.append(instance.process_template_response)
            if hasattr(instance, "process_exception"):
                self._exception_middleware.append(instance.process_exception)
            handler = convert_exception_to_response(instance)
        self._middleware_chain = handler


class ApiHandler(ApiMiddlewareMixin, WSGIHandler):
    """Django's WSGI handler with the API's middleware chain."""


class RoutingHandler:
    """The WSGI callable gunicorn serves: /api/ through `ApiHandler`, everything else (dashboard,
    admin, health, metrics, static) through Django's usual handler."""

    def __init__(self) -> None:
        self.site = WSGIHandler()
        self.api = ApiHandler()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        return (self.api if is_api(environ) else self.site)(environ, start_response)
