"""Stream tokens: short-lived, bound to one task, signed with SECRET_KEY (no storage).

The submit answer's `stream_url` carries one, so a browser's EventSource can follow that task
(its events and its poll URL) without ever holding the API key. A token is the timestamp and
signature of Django's TimestampSigner over the task id: it proves nothing about another task.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core import signing

_signer = signing.TimestampSigner(salt="taskhook.stream-token")
REFUSED = "The stream token is wrong, expired or not this task's."


def issue(task_id: uuid.UUID | str) -> str:
    signed = _signer.sign(str(task_id))
    return signed[len(str(task_id)) + 1 :]


def is_valid(task_id: uuid.UUID | str, token: str) -> bool:
    """True when `token` was issued for this task less than STREAM_TOKEN_SECONDS ago."""
    if not token or len(token) > 200:
        return False
    try:
        value = _signer.unsign(f"{task_id}:{token}", max_age=settings.STREAM_TOKEN_SECONDS)
    except signing.BadSignature:  # SignatureExpired is a BadSignature
        return False
    return value == str(task_id)
