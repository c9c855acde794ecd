"""Webhook signing: the one place that knows how a callback is signed (README: Callbacks).

- `X-Dify-Signature-V1`: lowercase hex HMAC-SHA256 of the exact body bytes, keyed with the
  current secret string's UTF-8 bytes (what existing Dify-style receivers compute).
- Standard Webhooks: `webhook-id`, `webhook-timestamp` and `webhook-signature`
  (`v1,<base64>` over `{id}.{timestamp}.{body}`, keyed with the base64-decoded part of the
  `whsec_` secret), computed by the `standardwebhooks` library. During a secret rotation's grace
  period one signature per live secret, space-separated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook


def webhook_id(task_id: uuid.UUID | str, run: int) -> str:
    """One id per task run: the same on every attempt of that run, new for the next run."""
    return f"msg_{uuid.UUID(str(task_id)).hex}_{run}"


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def dify_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_headers(
    *, secrets: list[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Signature headers for one delivery attempt; `secrets[0]` is the current secret."""
    signed_at = datetime.fromtimestamp(timestamp, tz=UTC)
    text = body.decode()
    standard = " ".join(
        Webhook(secret).sign(msg_id=message_id, timestamp=signed_at, data=text)
        for secret in secrets
    )
    return {
        "X-Dify-Signature-V1": dify_signature(secrets[0], body),
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard,
    }
