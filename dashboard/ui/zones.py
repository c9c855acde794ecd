"""The operator's time zone: UTC unless they chose another (kept in their session)."""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from functools import lru_cache

from django.http import HttpRequest, HttpResponse
from django.utils import timezone

SESSION_KEY = "taskhook_time_zone"
DEFAULT_ZONE = "UTC"


@lru_cache(maxsize=1)
def available_zones() -> tuple[str, ...]:
    return tuple(sorted(zoneinfo.available_timezones() - {"localtime", "Factory"}))


def is_valid_zone(name: str) -> bool:
    return name in available_zones()


class OperatorTimeZoneMiddleware:
    """Activates the session's zone for the request, so `{{ t|when }}` and forms use it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        session = getattr(request, "session", None)
        name = session.get(SESSION_KEY, DEFAULT_ZONE) if session is not None else DEFAULT_ZONE
        if name != DEFAULT_ZONE and is_valid_zone(name):
            timezone.activate(zoneinfo.ZoneInfo(name))
        else:
            timezone.deactivate()
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()


def zone_context(request: HttpRequest) -> dict:
    """Context processor: the zone every absolute time on the page is shown in."""
    return {"time_zone_name": timezone.get_current_timezone_name()}
