"""How every dashboard view answers: the page, or for HTMX the named partial; and how every
action answers: in place, with its message swapped into the page's message area.

An action's HTMX answer is the partial it changed (rendered after the change, so every value it
shows is the new one) plus `base.html#messages` out of band. Without JavaScript the same POST
redirects back (303) and the message shows on the next page.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.utils.http import url_has_allowed_host_and_scheme
from django_htmx.http import HttpResponseClientRedirect
from django_htmx.middleware import HtmxDetails

from dashboard.ui.access import is_operator


class HtmxHttpRequest(HttpRequest):
    """A dashboard request: django-htmx's middleware sets `request.htmx` on every one."""

    htmx: HtmxDetails


# Which navigation entry a template belongs to.
NAV: dict[str, str] = {
    "dashboard/overview.html": "overview",
    "dashboard/tasks.html": "tasks",
    "dashboard/task_detail.html": "tasks",
    "dashboard/batches.html": "batches",
    "dashboard/batch_detail.html": "batches",
    "dashboard/work.html": "work",
    "dashboard/failed_callbacks.html": "callbacks",
    "dashboard/failures.html": "failures",
    "dashboard/applications.html": "applications",
    "dashboard/application_detail.html": "applications",
    "dashboard/audit.html": "audit",
    "dashboard/history.html": "history",
    "dashboard/workers.html": "workers",
}


def page_or_partial(
    request: HtmxHttpRequest, template: str, partial: str, context: dict
) -> HttpResponse:
    """The whole page, or for an HTMX request (not a boosted navigation) just the partial."""
    context.setdefault("is_operator", is_operator(request.user))
    context.setdefault("nav", NAV.get(template))
    if request.htmx and not request.htmx.boosted:
        return render(request, f"{template}#{partial}", context)
    return render(request, template, context)


def safe_next(request: HtmxHttpRequest, fallback: str) -> str:
    """`next` from the form, only to this host: never `//host` or `/\\host`, which browsers
    take for another site."""
    target = request.POST.get("next") or fallback
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return fallback
    return target


def back(request: HtmxHttpRequest, fallback: str) -> HttpResponse:
    """After an action that changes the whole page: HTMX follows HX-Redirect, forms a 303."""
    target = safe_next(request, fallback)
    if request.htmx:
        return HttpResponseClientRedirect(target)
    return redirect(target)


def with_messages(request: HtmxHttpRequest, response: HttpResponse) -> HttpResponse:
    """Append the pending messages as an out-of-band swap of the page's message area."""
    response.write(render_to_string("base.html#messages", {"oob": True}, request=request))
    return response


def answer(
    request: HtmxHttpRequest,
    *,
    message: str,
    ok: bool = True,
    template: str,
    partial: str,
    context: dict,
    fallback: str,
    also: tuple[str, ...] = (),
) -> HttpResponse:
    """An action's answer: in place for HTMX (the changed partial, the partials named in `also`
    out of band — every panel that shows a changed value — and the message), or the message
    and a redirect back for a plain form. An `also` partial's root element carries
    `{% if oob %}hx-swap-oob="true"{% endif %}`."""
    (messages.success if ok else messages.warning)(request, message)
    if not request.htmx:
        return redirect(safe_next(request, fallback))
    context.setdefault("is_operator", is_operator(request.user))
    response = render(request, f"{template}#{partial}", context)
    for name in also:
        response.write(
            render_to_string(f"{template}#{name}", context | {"oob": True}, request=request)
        )
    return with_messages(request, response)
