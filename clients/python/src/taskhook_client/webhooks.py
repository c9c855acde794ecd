"""Verifying Taskhook's callbacks (docs/callbacks.md), as the server signs them
(tasks/delivery/signing.py):

- Standard Webhooks `webhook-signature`: space-separated entries over
  `"{webhook-id}.{webhook-timestamp}.{body}"`; `v1,<base64 HMAC-SHA256>` keyed with the
  base64-decoded part of the `whsec_` secret, `v1a,<base64 Ed25519 signature>` checked with the
  application's public keys (the JWKS at `/.well-known/taskhook/jwks.json`). Any entry that
  verifies is enough (two of a kind during a rotation); `webhook-timestamp` must be within
  `tolerance` seconds of now.
- `X-Dify-Signature-V1`: lowercase hex HMAC-SHA256 of the body keyed with the whole secret's
  UTF-8 bytes. It covers neither a timestamp nor the id, so it is only checked when the request
  carries no `webhook-signature` (a proxy that kept only the Dify header); with
  `webhook-signature` present, that decides.

Ed25519 needs the `cryptography` package (`pip install 'taskhook-client[ed25519]'`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from taskhook_client.errors import WebhookVerificationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

JWKS_PATH = "/.well-known/taskhook/jwks.json"
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
DEFAULT_TOLERANCE = 300  # seconds: what Standard Webhooks' libraries allow

# What `public_keys` may hold: a JWKS ({"keys": [...]}), JWK dicts, raw 32-byte keys, or
# cryptography's Ed25519PublicKey objects.
type PublicKeys = Mapping[str, Any] | Iterable[Mapping[str, Any] | bytes | Ed25519PublicKey]


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # the optional extra is not installed
        raise ImportError(
            "Ed25519 (v1a) verification needs cryptography: pip install 'taskhook-client[ed25519]'"
        ) from exc
    return ed25519


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_public_keys(keys: PublicKeys, app_id: str | None = None) -> list[Ed25519PublicKey]:
    """Ed25519 public keys out of a JWKS, JWKs, raw bytes or key objects. With `app_id`, only
    the JWKs whose `taskhook_app_id` is that application's (a Taskhook JWKS lists every
    application's keys, and Standard Webhooks has no key-id header to pick one)."""
    ed25519 = _ed25519()
    if isinstance(keys, Mapping):
        keys = keys.get("keys", [])
    loaded: list[Ed25519PublicKey] = []
    for key in keys:
        if isinstance(key, ed25519.Ed25519PublicKey):
            loaded.append(key)
        elif isinstance(key, bytes | bytearray):
            loaded.append(ed25519.Ed25519PublicKey.from_public_bytes(bytes(key)))
        elif isinstance(key, Mapping):
            if key.get("kty") != "OKP" or key.get("crv") != "Ed25519" or "x" not in key:
                continue
            if app_id is not None and key.get("taskhook_app_id") != str(app_id):
                continue
            loaded.append(ed25519.Ed25519PublicKey.from_public_bytes(_b64decode(key["x"])))
        else:
            raise TypeError(f"not a public key: {type(key).__name__}")
    return loaded


def hmac_key(secret: str) -> bytes:
    """The Standard Webhooks key of a `whsec_` secret: its base64 part, decoded."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the webhook secret is not a whsec_ secret (base64 after whsec_)") from exc


def _lower(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(name).lower(): str(value) for name, value in items}


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    secret: str | None = None,
    *,
    public_keys: PublicKeys | None = None,
    tolerance: float | None = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a callback and return its decoded JSON body; raise WebhookVerificationError if it
    does not verify.

    `body` must be the raw bytes as received (never re-serialised JSON). `headers` is any
    mapping or list of pairs; names are matched case-insensitively. Give the `whsec_` `secret`
    (HMAC: `v1` and `X-Dify-Signature-V1`), `public_keys` (Ed25519: `v1a`; see
    `load_public_keys`), or both. `tolerance` (seconds, None: no check) bounds how far
    `webhook-timestamp` may be from `now` (default: the clock), which stops replays; dedupe on
    `webhook-id` as well, since delivery is at least once.
    """
    if secret is None and public_keys is None:
        raise ValueError("give the webhook secret, the public keys, or both")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    found = _lower(headers)
    signature_header = found.get("webhook-signature")
    if signature_header is not None:
        _verify_standard(raw, found, signature_header, secret, public_keys, tolerance, now)
    elif "x-dify-signature-v1" in found and secret is not None:
        expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, found["x-dify-signature-v1"].strip().lower()):
            raise WebhookVerificationError("X-Dify-Signature-V1 does not match the body")
    else:
        raise WebhookVerificationError("no signature header this secret or key can check")
    try:
        decoded: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("the signed body is not JSON") from exc
    return decoded


def _verify_standard(
    body: bytes,
    headers: Mapping[str, str],
    signature_header: str,
    secret: str | None,
    public_keys: PublicKeys | None,
    tolerance: float | None,
    now: float | None,
) -> None:
    message_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "").strip()
    if not message_id or not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookVerificationError("webhook-id or webhook-timestamp is missing or malformed")
    if tolerance is not None:
        drift = abs((time.time() if now is None else now) - int(timestamp))
        if drift > tolerance:
            raise WebhookVerificationError(
                f"webhook-timestamp is {drift:.0f} s off (tolerance {tolerance:g} s)"
            )
    signed = f"{message_id}.{timestamp}.".encode() + body
    entries = [entry.partition(",") for entry in signature_header.split()]
    if secret is not None:
        expected = base64.b64encode(hmac.new(hmac_key(secret), signed, hashlib.sha256).digest())
        for version, _, signature in entries:
            if version == "v1" and hmac.compare_digest(expected, signature.encode()):
                return
    if public_keys is not None:
        keys = load_public_keys(public_keys)  # raises ImportError without cryptography
        from cryptography.exceptions import InvalidSignature

        for version, _, signature in entries:
            if version != "v1a":
                continue
            try:
                raw_signature = base64.b64decode(signature, validate=True)
            except (binascii.Error, ValueError):
                continue
            for key in keys:
                try:
                    key.verify(raw_signature, signed)
                    return
                except InvalidSignature:
                    pass
    raise WebhookVerificationError("no webhook-signature entry verifies")


def fetch_jwks(base_url: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """GET the server's JWKS (public, no API key); `load_public_keys(jwks, app_id)` picks an
    application's keys. Cache it (the server allows 300 s) and fetch again when nothing
    verifies, at most about once a minute: that picks up a rotated key."""
    import httpx

    response = httpx.get(base_url.rstrip("/") + JWKS_PATH, timeout=timeout)
    response.raise_for_status()
    jwks: dict[str, Any] = response.json()
    return jwks
