"""Built-in runners for upstreams that teams already run: `openai` (any OpenAI-compatible
chat-completions server: vLLM, Ollama, llama.cpp, a hosted API) and `dify` (a Dify workflow or
chat app). Both stream (tasks.execution.upstreams.sse) and stop within a fraction of a second of
a cancel. What they take and give: docs/runners.md.

Shared here: reading the runner_config values both have. The upstream's key is never in the
database: `api_key_env` names an environment variable of the worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tasks.execution.runners import RunnerError

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 24 * 3600.0


def base_url(config: dict[str, Any], runner: str) -> str:
    value = config.get("base_url")
    if not isinstance(value, str) or not value.strip():
        raise RunnerError(f"the {runner} runner needs runner_config.base_url")
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise RunnerError(
            f"runner_config.base_url must be an http:// or https:// URL, not {value!r}"
        )
    return value


def timeout(config: dict[str, Any]) -> float:
    value = config.get("timeout", DEFAULT_TIMEOUT)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_TIMEOUT
    ):
        raise RunnerError(f"runner_config.timeout must be seconds between 0 and {MAX_TIMEOUT:g}")
    return float(value)


def api_key_env(config: dict[str, Any]) -> str | None:
    name = config.get("api_key_env")
    if name in (None, ""):
        return None
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise RunnerError(
            "runner_config.api_key_env must name an environment variable (letters, digits, _)"
        )
    return name


def auth_headers(config: dict[str, Any]) -> dict[str, str]:
    """`Authorization: Bearer $KEY` from the worker's environment, or none without api_key_env."""
    name = api_key_env(config)
    if name is None:
        return {}
    key = os.environ.get(name)
    if not key:
        raise RunnerError(
            f"runner_config.api_key_env names {name}, which is not set in the worker's environment"
        )
    return {"Authorization": f"Bearer {key}"}


def extra_headers(config: dict[str, Any]) -> dict[str, str]:
    headers = config.get("headers") or {}
    if not isinstance(headers, dict):
        raise RunnerError("runner_config.headers must be a JSON object")
    return {str(name): str(value) for name, value in headers.items()}


def check_config(runner: str, config: dict[str, Any]) -> None:
    """RunnerError when `config` cannot work for the built-in `runner` (nothing for others):
    what applications.clean_settings reports before anything runs. The environment variable
    itself is not looked up here: it lives in the workers, not in the web process."""
    from tasks.execution.upstreams import dify, openai  # they import this module

    checks: dict[str, Callable[[dict[str, Any]], object]] = {
        "openai": openai.Config.of,
        "dify": dify.Config.of,
    }
    if runner in checks:
        checks[runner](config)
