"""Dashboard roles: viewers are staff; operators are staff with `tasks.operate` (or superusers)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_POST

OPERATE_PERMISSION = "tasks.operate"


def is_operator(user) -> bool:
    return bool(
        user.is_active
        and user.is_staff
        and (user.is_superuser or user.has_perm(OPERATE_PERMISSION))
    )


def staff_required(view: Callable) -> Callable:
    """Anonymous -> login page; logged in but not staff -> 403."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The dashboard is for staff.")
        return view(request, *args, **kwargs)

    return wrapper


def operator_required(view: Callable) -> Callable:
    """A POST-only action for operators; a viewer gets 403."""

    @require_POST
    @staff_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not is_operator(request.user):
            raise PermissionDenied("This action needs the operate permission.")
        return view(request, *args, **kwargs)

    return wrapper
