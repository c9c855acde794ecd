"""tasks.delivery.signing: both signatures, checked by independent code (hmac, standardwebhooks)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tasks.delivery import signing


def new_secret() -> str:
    return "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()


BODY = signing.encode_body({"event": "task.finished", "output": {"text": "héllo ☃ 🎉"}})


def headers_for(secrets: list[str], body: bytes = BODY, run: int = 1) -> dict[str, str]:
    return signing.signature_headers(
        secrets=secrets,
        message_id=signing.webhook_id(uuid.uuid4(), run),
        timestamp=int(time.time()),
        body=body,
    )


def test_dify_signature_is_hmac_sha256_hex_of_the_exact_body_with_the_secret_string():
    secret = new_secret()
    headers = headers_for([secret])
    expected = hmac.new(secret.encode("utf-8"), BODY, hashlib.sha256).hexdigest()
    assert headers["X-Dify-Signature-V1"] == expected
    assert re.fullmatch(r"[0-9a-f]{64}", expected)
    # Keyed with the whole string (not the base64-decoded part) and over the bytes as sent.
    assert signing.dify_signature(secret, BODY + b" ") != expected
    decoded = base64.b64decode(secret.removeprefix("whsec_"))
    assert hmac.new(decoded, BODY, hashlib.sha256).hexdigest() != expected


def test_header_set():
    secret = new_secret()
    headers = headers_for([secret])
    assert list(headers) == [
        "X-Dify-Signature-V1", "webhook-id", "webhook-timestamp", "webhook-signature",
    ]  # fmt: skip
    assert headers["webhook-timestamp"].isdigit()
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5


def test_standard_webhooks_signature_verifies_with_one_secret():
    secret = new_secret()
    headers = headers_for([secret])
    assert headers["webhook-signature"].startswith("v1,")
    assert " " not in headers["webhook-signature"]
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"task", b"tusk"), headers)


def test_standard_webhooks_signature_verifies_with_each_of_two_secrets():
    current, previous = new_secret(), new_secret()
    headers = headers_for([current, previous])
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    assert Webhook(current).verify(BODY, headers) == json.loads(BODY)
    assert Webhook(previous).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    # The Dify signature uses the current secret only.
    assert headers["X-Dify-Signature-V1"] == signing.dify_signature(current, BODY)


def test_webhook_id_format():
    task_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert signing.webhook_id(task_id, 1) == "msg_12345678123456781234567812345678_1"
    assert signing.webhook_id(str(task_id), 1) == signing.webhook_id(task_id, 1)
    assert signing.webhook_id(str(task_id).upper(), 2) == "msg_12345678123456781234567812345678_2"
    assert re.fullmatch(r"msg_[0-9a-f]{32}_\d+", signing.webhook_id(uuid.uuid4(), 17))
    with pytest.raises(ValueError):
        signing.webhook_id("not-a-uuid", 1)


def test_encode_body_is_compact_utf8_with_non_ascii_kept():
    payload = {"b": [1, 2.5, None, True], "a": "é☃🎉", "nested": {"k": "v"}}
    body = signing.encode_body(payload)
    assert body == '{"b":[1,2.5,null,true],"a":"é☃🎉","nested":{"k":"v"}}'.encode()
    assert b"\\u" not in body and b", " not in body and b": " not in body
    assert json.loads(body) == payload
    assert list(json.loads(body)) == ["b", "a", "nested"]  # key order kept
