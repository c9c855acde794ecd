"""verify_webhook against real deliveries: callbacks the stack's callback worker POSTs to a
receiver started here, for HMAC, Ed25519 and both-signing applications."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from taskhook_client import (
    AsyncTaskhook,
    Taskhook,
    WebhookVerificationError,
    fetch_jwks,
    load_public_keys,
    verify_webhook,
)

from .conftest import Application, Delivery, LiveStack, Receiver


def deliver(stack: LiveStack, app: Application, receiver: Receiver) -> Delivery:
    with Taskhook(stack.base_url, app.api_key) as client:
        accepted = client.submit(app.app_id, {"answer": "é"}, callback_url=receiver.url)
    delivery = receiver.next()
    assert json.loads(delivery.body)["task_id"] == accepted["task_id"]
    return delivery


def without(headers: dict[str, str], *names: str) -> dict[str, str]:
    drop = {name.lower() for name in names}
    return {key: value for key, value in headers.items() if key.lower() not in drop}


def test_hmac_delivery(stack: LiveStack, app: Application, receiver: Receiver) -> None:
    delivery = deliver(stack, app, receiver)
    assert delivery.headers["webhook-signature"].startswith("v1,")
    event = verify_webhook(delivery.body, delivery.headers, app.webhook_secret)
    assert event["event"] == "task.finished" and event["output"] == {"answer": "é"}
    # header names in any case, as a list of pairs
    pairs = [(name.upper(), value) for name, value in delivery.headers.items()]
    assert verify_webhook(delivery.body, pairs, app.webhook_secret) == event
    # the Dify header alone (no webhook-signature) still verifies with the secret
    dify_only = without(delivery.headers, "webhook-signature")
    assert verify_webhook(delivery.body, dify_only, app.webhook_secret) == event

    unsigned = without(delivery.headers, "webhook-signature", "X-Dify-Signature-V1")
    refusals = {
        "tampered body": (delivery.body.replace(b"succeeded", b"failed"), delivery.headers),
        "tampered id": (delivery.body, delivery.headers | {"webhook-id": "msg_other_1"}),
        "no signature": (delivery.body, unsigned),
        "dify tampered": (delivery.body + b" ", dify_only),
    }
    for name, (body, headers) in refusals.items():
        with pytest.raises(WebhookVerificationError):
            verify_webhook(body, headers, app.webhook_secret)
            pytest.fail(f"{name} verified")
    other_secret = stack.create_application().webhook_secret
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, delivery.headers, other_secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, dify_only, other_secret)


def test_timestamp_tolerance(stack: LiveStack, app: Application, receiver: Receiver) -> None:
    delivery = deliver(stack, app, receiver)
    signed_at = int(delivery.headers["webhook-timestamp"])
    secret = app.webhook_secret
    assert verify_webhook(delivery.body, delivery.headers, secret, now=signed_at + 299)
    with pytest.raises(WebhookVerificationError, match="off"):
        verify_webhook(delivery.body, delivery.headers, secret, now=signed_at + 301)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, delivery.headers, secret, now=signed_at - 400)
    assert verify_webhook(delivery.body, delivery.headers, secret, now=signed_at + 8, tolerance=10)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, delivery.headers, secret, now=signed_at + 8, tolerance=5)
    # a later timestamp header on the same signature: replaying with a fresh time fails
    replayed = delivery.headers | {"webhook-timestamp": str(signed_at + 1)}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, replayed, secret, now=signed_at + 1)
    assert verify_webhook(delivery.body, delivery.headers, secret, tolerance=None, now=0)


def test_ed25519_delivery(stack: LiveStack, receiver: Receiver) -> None:
    signer = stack.create_application("--rate-limit", "0", "--signing", "ed25519")
    other = stack.create_application("--rate-limit", "0", "--signing", "ed25519")
    delivery = deliver(stack, signer, receiver)
    signature = delivery.headers["webhook-signature"]
    assert signature.startswith("v1a,") and "X-Dify-Signature-V1" not in delivery.headers
    with Taskhook(stack.base_url, signer.api_key) as client:
        keys = client.public_keys(signer.app_id)
        jwks = client.jwks()
    assert len(keys) == 1
    event = verify_webhook(delivery.body, delivery.headers, public_keys=keys)
    assert event["event"] == "task.finished"
    # a JWKS as fetched, filtered to the application, or as JWK dicts, or raw bytes
    fetched = fetch_jwks(stack.base_url)
    assert fetched == jwks
    mine = [jwk for jwk in fetched["keys"] if jwk["taskhook_app_id"] == signer.app_id]
    assert verify_webhook(delivery.body, delivery.headers, public_keys=mine) == event
    raw = [key.public_bytes_raw() for key in keys]
    assert verify_webhook(delivery.body, delivery.headers, public_keys=raw) == event
    assert verify_webhook(delivery.body, delivery.headers, public_keys=fetched) == event
    # another application's key, the signer's secret, a tampered body: refused
    with pytest.raises(WebhookVerificationError):
        verify_webhook(
            delivery.body, delivery.headers, public_keys=load_public_keys(fetched, other.app_id)
        )
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body, delivery.headers, signer.webhook_secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(delivery.body + b"\n", delivery.headers, public_keys=keys)


def test_both_signatures(stack: LiveStack, receiver: Receiver) -> None:
    signer = stack.create_application("--rate-limit", "0", "--signing", "both")
    delivery = deliver(stack, signer, receiver)
    entries = delivery.headers["webhook-signature"].split()
    assert [entry.split(",")[0] for entry in entries] == ["v1", "v1a"]

    async def keys() -> list[Ed25519PublicKey]:
        async with AsyncTaskhook(stack.base_url, signer.api_key) as client:
            return await client.public_keys(signer.app_id)

    public_keys = asyncio.run(keys())
    by_secret = verify_webhook(delivery.body, delivery.headers, signer.webhook_secret)
    by_key = verify_webhook(delivery.body, delivery.headers, public_keys=public_keys)
    wrong_secret_right_key = verify_webhook(
        delivery.body, delivery.headers, "whsec_" + "A" * 44, public_keys=public_keys
    )
    assert by_secret == by_key == wrong_secret_right_key


def test_batch_finished_delivery(stack: LiveStack, app: Application, receiver: Receiver) -> None:
    with Taskhook(stack.base_url, app.api_key) as client:
        accepted = client.submit_batch(
            app.app_id, [{"inputs": {"n": 1}}, {"inputs": {"n": 2}}], callback_url=receiver.url
        )
    delivery = receiver.next()
    event = verify_webhook(delivery.body, delivery.headers, app.webhook_secret)
    assert event["event"] == "batch.finished" and event["batch_id"] == accepted["batch_id"]
    assert delivery.headers["webhook-id"].startswith("msg_batch_")
    assert event["counts"]["succeeded"] == 2


def test_verify_needs_a_secret_or_keys() -> None:
    with pytest.raises(ValueError, match="secret"):
        verify_webhook(b"{}", {})
