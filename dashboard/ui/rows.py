"""The long tables' rows (100 tasks, a batch's 100 items, an endpoint's 100 attempts, an error
group's applications) as HTML built in Python, the markup the templates' loops wrote.

Rendered by the template engine, a row of ten cells cost about 0.5 ms (each variable, filter,
`{% url %}` and `date` resolved through the engine's lookups): 53 ms for a page of 100 tasks,
more than every query of the page together. Here a row is one f-string of the row's values,
the task URL reversed once per table, and the same filters' rules: `date:'c'`
(isoformat of the time in the active zone), `date:"Y-m-d H:i:s"`, `truncatechars`, `duration`,
`clock`. Every text is escaped as the engine's autoescape did.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime

from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe
from django.utils.text import Truncator

from dashboard.templatetags.taskhook import clock, duration

_PLACEHOLDER = uuid.UUID(int=0)


def e(value: object) -> str:
    """Autoescape's rule (django.utils.html.escape is this, behind a lazy-string wrapper)."""
    return html.escape(str(value))


def _task_url() -> Callable[[str], str]:
    """The task page's URL for an id: reversed once (the script prefix included), the id put
    in its place."""
    template = reverse("dashboard:task", args=[_PLACEHOLDER])
    head, _, tail = template.partition(str(_PLACEHOLDER))
    return lambda task_id: f"{head}{task_id}{tail}"


def application_links(applications: Iterable) -> SafeString:
    """The Failures page's applications of a group: each a link to its page, or a dash."""
    template = reverse("dashboard:application", args=[_PLACEHOLDER])
    head, _, tail = template.partition(str(_PLACEHOLDER))
    links = [f'<a href="{head}{app.pk}{tail}">{e(app.name)}</a>' for app in applications]
    return mark_safe(", ".join(links) or '<span class="hint">\u2013</span>')  # noqa: S308


def truncate(value: str, length: int) -> str:
    """`truncatechars:length`: Django's Truncator only for a text longer than that."""
    text = str(value)
    return text if len(text) <= length else Truncator(text).chars(length)


def _local(value: datetime) -> datetime:
    return timezone.localtime(value) if timezone.is_aware(value) else value


def _status_badge(status: str) -> str:
    """`status` escaped already."""
    return f'<span class="badge {status}">{status}</span>'


def _callback_badge(callback_status: str) -> str:
    if callback_status == "none":
        return ""
    state = e(callback_status)
    return f'<span class="badge cb-{state}">{state}</span>'


def _task_link(url: Callable[[str], str], task_id: str, label: str) -> str:
    return f'<a href="{url(task_id)}"><code>{label}</code></a>'


def task_rows(tasks: Iterable, *, is_operator: bool) -> SafeString:
    """dashboard/_task_rows.html's rows (the task list, the failed callbacks)."""
    url = _task_url()
    parts = []
    for task in tasks:
        task_id = str(task.id)  # ids and numbers need no escaping; every text is escaped
        check = (
            f'<td><input type="checkbox" name="task" value="{task_id}" form="bulk-form" '
            f'aria-label="select {task_id}"></td>'
            if is_operator
            else ""
        )
        status = e(task.status)
        extra = f" {int(task.progress)}%" if task.status == "running" else ""
        if task.priority != "normal":
            priority = e(task.priority)
            extra += f' <span class="hint priority-{priority}">{priority}</span>'
        callback = _callback_badge(task.callback_status)
        if callback:
            callback += f" {int(task.callback_attempts)}\u00d7"
            if task.callback_last_status_code:
                callback += f" ({int(task.callback_last_status_code)})"
        created = _local(task.created_at)
        parts.append(
            f'    <tr class="status-{status}">\n      {check}\n'
            f"      <td>{_task_link(url, task_id, task_id[:8])}</td>\n"
            f"      <td>{e(task.application.name)}</td>\n"
            f"      <td>{_status_badge(status)}{extra}</td>\n"
            f'      <td class="num">{int(task.run)}</td>\n'
            f"      <td>{e(task.user)}</td>\n"
            f'      <td title="{created.isoformat()}">{created:%Y-%m-%d %H:%M:%S}</td>\n'
            f'      <td class="num">{e(duration(task.started_at, task.finished_at))}</td>\n'
            f"      <td>{callback}</td>\n"
            f'      <td class="err">{e(truncate(task.error, 80))}</td>\n'
            "    </tr>\n"
        )
    return mark_safe("".join(parts))  # noqa: S308 (every text in it escaped)


def batch_item_rows(items: Iterable) -> SafeString:
    """dashboard/batch_detail.html's item rows."""
    url = _task_url()
    parts = []
    for item in items:
        task_id = str(item.id)
        status = e(item.status)
        callback = _callback_badge(item.callback_status)
        code = f"<code>{e(item.error_code)}</code> " if item.error_code else ""
        finished = e(clock(item.finished_at)) if item.finished_at else ""
        parts.append(
            f'      <tr class="status-{status}" data-index="{item.batch_index}">\n'
            f'        <td class="num">{item.batch_index}</td>\n'
            f"        <td>{_task_link(url, task_id, '\u2026' + task_id[-8:])}</td>\n"
            f"        <td>{_status_badge(status)}</td>\n"
            f'        <td class="num">{int(item.run)}</td>\n'
            f"        <td>{e(item.user)}</td>\n"
            f'        <td class="num">{e(duration(item.started_at, item.finished_at))}</td>\n'
            f"        <td>{finished}</td>\n"
            f"        <td>{callback}</td>\n"
            f'        <td class="err">{code}{e(truncate(item.error, 80))}</td>\n'
            "      </tr>\n"
        )
    return mark_safe("".join(parts))  # noqa: S308 (every text in it escaped)


def attempt_rows(attempts: Iterable) -> SafeString:
    """dashboard/endpoint_detail.html's recent attempts."""
    url = _task_url()
    parts = []
    for attempt in attempts:
        task_id = str(attempt.task_id)
        status_code = int(attempt.status_code) if attempt.status_code else "\u2013"
        parts.append(
            f'      <tr class="{"ok" if attempt.delivered else "failed"}">\n'
            f"        <td>{e(clock(attempt.started_at))}</td>\n"
            f"        <td>{_task_link(url, task_id, task_id[:8])}</td>\n"
            f'        <td class="num">{int(attempt.number)}</td>\n'
            f"        <td>{e(attempt.trigger)}</td>\n"
            f'        <td class="num">{status_code}</td>\n'
            f'        <td class="num">{int(attempt.duration_ms)}</td>\n'
            f'        <td class="err">{e(truncate(attempt.error, 100))}</td>\n'
            "      </tr>\n"
        )
    return mark_safe("".join(parts))  # noqa: S308 (every text in it escaped)
