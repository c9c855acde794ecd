"""`GET /.well-known/taskhook/jwks.json`: the public halves of the applications' Ed25519
signing keys as a JWKS (RFC 7517 with RFC 8037's OKP keys; README: Callbacks), so a receiver
verifies `v1a` signatures holding no secret.

Public, like any JWKS: a public key reveals nothing. Each key names its application
(`taskhook_app_id`): a receiver keeps its application's keys and tries each (Standard Webhooks
has no key-id header). Listed: the current key of every application that signs with ed25519 or
both, and a rotated-out key until its grace period ends (tasks.credentials.signing_keys). One
query, however many applications; clients may cache the answer for CACHE_SECONDS, which is why a
rotation's grace period should outlast it.
"""

from __future__ import annotations

import base64

from django.http import HttpRequest, JsonResponse

from tasks import credentials
from tasks.api.views import api_view
from tasks.delivery import signing
from tasks.models import Application

KEY_FIELDS = (
    "id", "signing", "signing_key", "signing_key_id", "previous_signing_key",
    "previous_signing_key_id", "previous_signing_key_expires_at",
)  # fmt: skip


def jwk(*, kid: str, key: str, application_id: str) -> dict[str, str]:
    x = base64.urlsafe_b64encode(signing.public_key_bytes(key)).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA",
            "taskhook_app_id": application_id}  # fmt: skip


@api_view("GET", "HEAD")
def jwks(request: HttpRequest) -> JsonResponse:
    applications = (
        Application.objects.exclude(signing=Application.Signing.HMAC)
        .exclude(signing_key="")
        .only(*KEY_FIELDS)
        .order_by("created_at", "id")
    )
    keys = [
        jwk(kid=kid, key=key, application_id=str(application.pk))
        for application in applications
        for kid, key in credentials.signing_keys(application)
    ]
    response = JsonResponse({"keys": keys})
    response["Cache-Control"] = f"public, max-age={signing.JWKS_CACHE_SECONDS}"
    return response
