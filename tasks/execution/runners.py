"""Runners: the code a worker calls to do a task's work, `run(inputs, ctx) -> dict`.

Built-ins are named (`echo`, `sleep`, `fail`, `http`); any other runner is a dotted path to a
callable. `ctx.progress(n)` and `ctx.log(msg)` report to the dashboard and raise `TaskCancelled`
once the task was cancelled, which is how a cooperative runner stops early.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import urllib3
from django.utils.module_loading import import_string


class RunnerError(Exception):
    """A runner's clear, expected failure (bad upstream answer, bad input)."""


class TaskCancelled(Exception):
    """Raised inside a runner when its task was cancelled or its run is no longer current."""


class RunContext(Protocol):
    config: dict[str, Any]

    def progress(self, percent: int) -> None: ...

    def log(self, message: str, level: str = "info") -> None: ...


Runner = Callable[[dict[str, Any], RunContext], Any]


def echo(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    return inputs


def sleep(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Sleep `inputs.seconds` (default 1), reporting progress about ten times along the way."""
    try:
        seconds = float(inputs.get("seconds", 1))
    except (TypeError, ValueError) as exc:
        raise RunnerError("inputs.seconds must be a number") from exc
    if not 0 <= seconds <= 24 * 3600:
        raise RunnerError("inputs.seconds must be between 0 and 86400")
    steps = max(1, min(10, int(seconds * 10)))
    ctx.log(f"sleeping {seconds:g} s")
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        ctx.progress(step * 100 // steps)
    return {"slept": seconds}


def fail(inputs: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    raise RunnerError(str(inputs.get("message") or "fail runner raised as asked"))


def http(inputs: dict[str, Any], ctx: RunContext) -> Any:
    """POST the inputs as JSON to `runner_config.url` and return the JSON it answers."""
    url = ctx.config.get("url")
    if not url:
        raise RunnerError("the http runner needs runner_config.url")
    timeout = float(ctx.config.get("timeout", 300))
    headers = {str(k): str(v) for k, v in (ctx.config.get("headers") or {}).items()}
    ctx.log(f"POST {url}")
    try:
        response = urllib3.request(
            "POST",
            url,
            json=inputs,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
            redirect=False,
        )
    except urllib3.exceptions.NewConnectionError as exc:  # before TimeoutError: a subclass
        raise RunnerError(f"upstream request failed: {exc}") from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise RunnerError(f"upstream did not answer within {timeout:g} s") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise RunnerError(f"upstream request failed: {exc}") from exc
    text = response.data.decode("utf-8", errors="replace")
    if not 200 <= response.status < 300:
        raise RunnerError(f"upstream answered HTTP {response.status}: {text[:500]}")
    try:
        return response.json()
    except ValueError as exc:
        raise RunnerError(f"upstream answered invalid JSON: {text[:200]!r}") from exc


BUILTIN_RUNNERS: dict[str, Runner] = {"echo": echo, "sleep": sleep, "fail": fail, "http": http}


def resolve_runner(name: str) -> Runner:
    """The callable behind a runner name; raises RunnerError when there is none."""
    if name in BUILTIN_RUNNERS:
        return BUILTIN_RUNNERS[name]
    if "." not in name:
        raise RunnerError(
            f"unknown runner {name!r}: use one of {', '.join(BUILTIN_RUNNERS)} or a dotted path"
        )
    try:
        runner = import_string(name)
    except ImportError as exc:
        raise RunnerError(f"cannot import runner {name!r}: {exc}") from exc
    if not callable(runner):
        raise RunnerError(f"runner {name!r} is not callable")
    return runner
