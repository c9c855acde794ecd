"""Control: the Workers page (queues with pause/resume, every worker with its host, process and
current task) and its actions. Pausing is tasks.execution.pausing; stopping is a command on the
worker's RQ channel, so it reaches a worker wherever it runs."""

from __future__ import annotations

import redis
from django.http import HttpResponse
from django.urls import reverse
from rq.command import send_command, send_kill_horse_command, send_shutdown_command

from dashboard.ui.access import operator_required, staff_required
from dashboard.ui.responses import HtmxHttpRequest, answer, page_or_partial, safe_next
from tasks import audit
from tasks.execution import pausing
from tasks.execution.worker import KNOWN_WORKERS_KEY, STOP_NOW_COMMAND
from tasks.plumbing.queueing import redis_client
from tasks.selectors import queues as queue_info

PAGE = "dashboard/workers.html"
QUEUES_PARTIAL = "dashboard/_queues.html"


def _control_context() -> dict:
    context: dict = {"queues": [], "workers": [], "redis_error": ""}
    try:
        context["queues"] = queue_info.queue_stats()
        paused = {queue.name for queue in context["queues"] if queue.paused}
        context["workers"] = queue_info.workers(paused)
    except redis.RedisError as exc:
        context["redis_error"] = f"{type(exc).__name__}: {exc}"
    return context


@staff_required
def workers_page(request: HtmxHttpRequest) -> HttpResponse:
    return page_or_partial(request, PAGE, "control", _control_context())


@operator_required
def queue_pause(request: HtmxHttpRequest) -> HttpResponse:
    """Pause or resume a queue for every worker (action=pause|resume)."""
    name = request.POST.get("queue", "")
    action = request.POST.get("action", "")
    if action not in ("pause", "resume"):
        return HttpResponse("Unknown queue action.", status=400)
    username = request.user.get_username()
    try:
        if action == "pause":
            changed = pausing.pause_queue(name=name, username=username)
        else:
            changed = pausing.resume_queue(name=name, username=username)
    except pausing.PauseRefused as refused:
        return HttpResponse(str(refused), status=400)
    except redis.RedisError as exc:
        return HttpResponse(f"Redis is unreachable: {exc}", status=503)
    if changed:
        audit.record(user=request.user, action=f"queue.{action}", target_type="queue",
                     target_id=name, target_label=name)  # fmt: skip
    if action == "pause":
        message = (f"Queue {name} paused: no worker takes its jobs until it is resumed."
                   if changed else f"Queue {name} was already paused.")  # fmt: skip
    else:
        message = f"Queue {name} resumed." if changed else f"Queue {name} was not paused."
    context = _control_context()
    if safe_next(request, "").startswith(reverse("dashboard:workers")):
        context["nav"] = "workers"  # the table's link to this page is left out there
    return answer(request, message=message, ok=changed, template=QUEUES_PARTIAL,
                  partial="queues", context=context,
                  fallback=reverse("dashboard:workers"))  # fmt: skip


@operator_required
def worker_stop(request: HtmxHttpRequest) -> HttpResponse:
    """Stop a worker: warmly (mode=warm: its current job finishes, then it exits) or at once
    (mode=now: the job is interrupted and its task recovered by the reconciler)."""
    name = request.POST.get("worker", "")
    mode = request.POST.get("mode", "")
    if mode not in ("warm", "now"):
        return HttpResponse("Unknown stop mode.", status=400)
    client = redis_client()
    try:
        if name not in queue_info.worker_names():
            return HttpResponse("No such worker (it may have stopped already).", status=404)
        if mode == "warm":
            send_shutdown_command(client, name)
        elif client.sismember(KNOWN_WORKERS_KEY, name):
            send_command(client, name, STOP_NOW_COMMAND)
        else:
            # Not a Taskhook worker: what RQ offers, a forking worker's horse killed first.
            send_kill_horse_command(client, name)
            send_shutdown_command(client, name)
    except redis.RedisError as exc:
        return HttpResponse(f"Redis is unreachable: {exc}", status=503)
    action = "worker.stop" if mode == "warm" else "worker.stop_now"
    audit.record(user=request.user, action=action, target_type="worker", target_id=name,
                 target_label=name)  # fmt: skip
    message = (
        f"Worker {name} stops after its current job."
        if mode == "warm"
        else f"Worker {name} is stopping at once; an interrupted task is recovered by the "
        "reconciler."
    )
    return answer(request, message=message, template=PAGE, partial="workers",
                  context=_control_context(), fallback=reverse("dashboard:workers"))  # fmt: skip
