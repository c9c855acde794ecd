"""Webhook signing: the one place that knows how a callback is signed (README: Callbacks).

- `X-Dify-Signature-V1`: lowercase hex HMAC-SHA256 of the exact body bytes, keyed with the
  current secret string's UTF-8 bytes (what existing Dify-style receivers compute).
- Standard Webhooks: `webhook-id`, `webhook-timestamp` and `webhook-signature`
  (`v1,<base64>` over `{id}.{timestamp}.{body}`, keyed with the base64-decoded part of the
  `whsec_` secret), computed by the `standardwebhooks` library. During a secret rotation's grace
  period one signature per live secret, space-separated.
- Standard Webhooks `v1a`: base64 of the Ed25519 signature over the same `{id}.{timestamp}.{body}`,
  one per live signing key, beside the `v1` ones in `webhook-signature`. An application that
  signs with Ed25519 only sends neither `v1` nor `X-Dify-Signature-V1`: its receivers hold no
  secret, only the public keys of the JWKS (tasks.api.jwks).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from standardwebhooks import Webhook

# How long a receiver may cache the JWKS (its Cache-Control): a rotation's grace is at least
# this, so a receiver whose copy predates the new key still finds the old one signing.
JWKS_CACHE_SECONDS = 300
SIGNING_KEY_PREFIX = "whsk_"  # Standard Webhooks' prefix of an asymmetric secret key


class SigningMaterial(TypedDict):
    """What signs a delivery (tasks.credentials.signing_material), current first in each."""

    secrets: list[str]  # HMAC secrets; empty when the application signs with Ed25519 only
    ed25519_keys: list[str]  # signing keys; empty when it signs with HMAC only


def webhook_id(task_id: uuid.UUID | str, run: int) -> str:
    """One id per task run: the same on every attempt of that run, new for the next run."""
    return f"msg_{uuid.UUID(str(task_id)).hex}_{run}"


def batch_webhook_id(batch_id: uuid.UUID | str, completion: int) -> str:
    """One id per completion of a batch: the same on every attempt of its `batch.finished`."""
    return f"msg_batch_{uuid.UUID(str(batch_id)).hex}_{completion}"


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def dify_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=256)  # a worker signs with the same few keys all day
def private_key(key: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        base64.b64decode(key.removeprefix(SIGNING_KEY_PREFIX))
    )


def new_signing_key() -> str:
    raw = Ed25519PrivateKey.generate().private_bytes_raw()
    return SIGNING_KEY_PREFIX + base64.b64encode(raw).decode()


def public_key_bytes(key: str) -> bytes:
    """The raw public half of a signing key (what the JWKS publishes as `x`)."""
    return private_key(key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_signature(key: str, *, message_id: str, timestamp: int, body: bytes) -> str:
    signed = private_key(key).sign(f"{message_id}.{timestamp}.".encode() + body)
    return "v1a," + base64.b64encode(signed).decode()


def signature_headers(
    *,
    secrets: Sequence[str],
    ed25519_keys: Sequence[str] = (),
    message_id: str,
    timestamp: int,
    body: bytes,
) -> dict[str, str]:
    """Signature headers for one delivery attempt: HMAC (`v1`, `X-Dify-Signature-V1`) with each
    of `secrets`, Ed25519 (`v1a`) with each of `ed25519_keys`, the current one first in each."""
    if not secrets and not ed25519_keys:
        raise ValueError("nothing to sign with: give a secret or a signing key")
    signed_at = datetime.fromtimestamp(timestamp, tz=UTC)
    text = body.decode()
    signatures = [
        Webhook(secret).sign(msg_id=message_id, timestamp=signed_at, data=text)
        for secret in secrets
    ]
    signatures += [
        ed25519_signature(key, message_id=message_id, timestamp=timestamp, body=body)
        for key in ed25519_keys
    ]
    headers = {"X-Dify-Signature-V1": dify_signature(secrets[0], body)} if secrets else {}
    return headers | {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }
