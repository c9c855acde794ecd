"""API keys, webhook secrets and signing keys: how they are made, stored and checked.

API keys are random 256-bit tokens, so a single SHA-256 is a sufficient at-rest hash (no slow KDF
is needed for high-entropy secrets); the lookup is by hash, and the found hash is compared again in
constant time. Webhook secrets and Ed25519 signing keys must be kept in clear: the worker signs
with them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from tasks.delivery import signing
from tasks.models import ApiKey, Application

API_KEY_PREFIX = "thk_"
SIGNING_KEY_ID_PREFIX = "ed25519_"
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_signing_key() -> tuple[str, str]:
    """A new Ed25519 signing key and its key id (the JWKS `kid`)."""
    return signing.new_signing_key(), SIGNING_KEY_ID_PREFIX + secrets.token_hex(6)


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw: str  # shown once, never stored


def issue_api_key(*, application_id: uuid.UUID | str) -> IssuedKey:
    raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        application_id=application_id, prefix=raw[:12], key_hash=hash_api_key(raw)
    )
    return IssuedKey(api_key=key, raw=raw)


# digest -> (monotonic deadline, key with its application). A hit skips the database on the hot
# submit/poll path; expiry is still checked on every use, so a rotated key stops on time, and a
# changed application setting or a revoked key takes effect within AUTH_CACHE_SECONDS.
_auth_cache: dict[str, tuple[float, ApiKey]] = {}
AUTH_CACHE_MAX = 10_000


def authenticate(raw_key: str) -> ApiKey | None:
    """The live key matching `raw_key`, with its application loaded; None if none matches."""
    if not raw_key or len(raw_key) > 200:
        return None
    digest = hash_api_key(raw_key)
    now = timezone.now()
    ttl = settings.AUTH_CACHE_SECONDS
    cached = _auth_cache.get(digest) if ttl else None
    key: ApiKey | None
    if cached and cached[0] > time.monotonic():
        key = cached[1]
        if key.expires_at is not None and key.expires_at <= now:
            _auth_cache.pop(digest, None)
            return None
        _touch(key, now)
        return key
    key = (
        ApiKey.objects.select_related("application")
        .filter(key_hash=digest, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    if ttl:
        if len(_auth_cache) >= AUTH_CACHE_MAX:
            _auth_cache.clear()
        _auth_cache[digest] = (time.monotonic() + ttl, key)
    _touch(key, now)
    return key


@dataclass(frozen=True)
class Revocation:
    revoked: list[ApiKey]  # revoked by this call
    already: list[ApiKey]  # matched, but revoked before


def normalise_prefix(prefix: str) -> str:
    """The prefix as the dashboard and `createapplication` display it, ellipsis and all."""
    return prefix.strip().removesuffix("…").removesuffix("...")


def revoke_api_keys(
    *,
    application_id: uuid.UUID | str | None = None,
    prefix: str | None = None,
    key_id: int | None = None,
) -> Revocation:
    """Revoke at once every key matching all the given filters (at least one). This process
    forgets them now; other web processes within AUTH_CACHE_SECONDS (their lookup cache)."""
    if application_id is None and prefix is None and key_id is None:
        raise ValueError("name the keys to revoke: an application, a prefix or a key id")
    keys = ApiKey.objects.select_related("application").order_by("created_at")
    if application_id is not None:
        keys = keys.filter(application_id=application_id)
    if prefix is not None:
        keys = keys.filter(prefix=normalise_prefix(prefix))
    if key_id is not None:
        keys = keys.filter(pk=key_id)
    found = list(keys)
    live = [key for key in found if key.revoked_at is None]
    now = timezone.now()
    ApiKey.objects.filter(pk__in=[key.pk for key in live], revoked_at__isnull=True).update(
        revoked_at=now
    )
    for key in live:
        key.revoked_at = now
        _auth_cache.pop(key.key_hash, None)
    return Revocation(revoked=live, already=[key for key in found if key not in live])


def forget_cached_keys(*, application_id: uuid.UUID | str) -> None:
    """Drop this process's cached lookups of an application's keys (after a rotation)."""
    for digest, (_, key) in list(_auth_cache.items()):
        if str(key.application_id) == str(application_id):
            _auth_cache.pop(digest, None)


def _touch(key: ApiKey, now) -> None:
    # Bounded write amplification: last_used_at moves at most once a minute per key.
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        key.last_used_at = now
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)


def signing_secrets(application: Application) -> list[str]:
    """Secrets that sign a delivery now: the current one first, then one in its grace period."""
    found = [application.webhook_secret]
    if (
        application.previous_webhook_secret
        and application.previous_secret_expires_at
        and application.previous_secret_expires_at > timezone.now()
    ):
        found.append(application.previous_webhook_secret)
    return found


def signing_keys(application: Application) -> list[tuple[str, str]]:
    """(kid, key) of the signing keys that sign now and are published in the JWKS: none for an
    application that signs with HMAC only, else the current one, then one in its grace period."""
    if application.signing == Application.Signing.HMAC or not application.signing_key:
        return []
    found = [(application.signing_key_id, application.signing_key)]
    if (
        application.previous_signing_key
        and application.previous_signing_key_expires_at
        and application.previous_signing_key_expires_at > timezone.now()
    ):
        found.append((application.previous_signing_key_id, application.previous_signing_key))
    return found


def signing_material(application: Application) -> signing.SigningMaterial:
    """What signs a delivery now (tasks.delivery.signing.signature_headers takes it as is). An
    ed25519 application without a key (a row changed behind the services' back) signs with its
    secret rather than not at all."""
    keys = [key for _, key in signing_keys(application)]
    hmac_signs = application.signing != Application.Signing.ED25519 or not keys
    return {"secrets": signing_secrets(application) if hmac_signs else [], "ed25519_keys": keys}
