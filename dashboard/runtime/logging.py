"""Log formatting: readable text by default, JSON lines with LOG_FORMAT=json.

Task-related lines carry `task_id`, `app_id`, `run` and `attempt` (passed as `extra=`), in both
formats. Secrets never reach a log line: API keys and webhook secrets are never passed to a logger,
and `redact` masks anything shaped like one that slips into a message.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

CONTEXT_FIELDS = ("task_id", "app_id", "run", "attempt")
SECRET_PATTERN = re.compile(r"(thk_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+|(whsec_)[A-Za-z0-9+/=]+")


def redact(text: str) -> str:
    return SECRET_PATTERN.sub(lambda m: (m.group(1) or m.group(2)) + "…redacted", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)
        )
        line = super().format(record)
        return redact(f"{line} [{context}]" if context else line)
