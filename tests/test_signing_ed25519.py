"""Ed25519 (`v1a`) signatures and the JWKS (README: Callbacks, "Public-key signatures"): real
deliveries to a real HTTP receiver, verified the way a receiver would, with the public key fetched
from `/.well-known/taskhook/jwks.json` and the stock `cryptography` library (and `v1` with the
`standardwebhooks` library). Task and batch callbacks are delivered in this process (what the
callback worker's job calls); the last tests send task callbacks and intermediate webhooks
through a real worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import timedelta
from io import StringIO

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tasks.applications import InvalidApplication, rotate_signing_key, update_application
from tasks.batches import completion
from tasks.delivery import batch_callbacks, callbacks
from tasks.models import Application, AuditEntry, Task
from tests.conftest import Client, Received, api_submit, clean_redis, wait_for
from tests.test_batches import submit_batch

pytestmark = pytest.mark.django_db(transaction=True)

JWKS_URL = "/.well-known/taskhook/jwks.json"


@pytest.fixture(autouse=True)
def _clean(transactional_db):
    clean_redis()
    yield
    clean_redis()


def app_with(make_app, signing: str):
    app = make_app("echo")
    update_application(application_id=app.application.id, signing=signing)
    return app


def deliver_one(app, receiver) -> dict[str, str]:
    """One finished task's callback, delivered in this process; the headers it arrived with."""
    task = Task.objects.create(
        application=app.application, inputs={}, callback_url=receiver.url, status="succeeded",
        output={"answer": "退款 ✓"}, finished_at=timezone.now(), callback_status="pending",
    )  # fmt: skip
    before = len(receiver.received)
    assert callbacks.deliver(task_id=task.id, run=task.run, trigger="auto", auto_attempt=1) == (
        "delivered"
    )
    assert len(receiver.received) == before + 1
    return lowered(receiver.received[-1])


def lowered(request: Received) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def published_keys(app_id) -> dict[str, Ed25519PublicKey]:
    """kid -> public key, as a receiver reads them: fetch the JWKS, keep its application's."""
    response = Client().get(JWKS_URL)
    assert response.status_code == 200
    found = {}
    for jwk in response.json()["keys"]:
        if jwk["taskhook_app_id"] == str(app_id):
            raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
            found[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(raw)
    return found


def verifies(key: Ed25519PublicKey, headers: dict[str, str], body: bytes) -> bool:
    """Whether any `v1a` signature of the delivery verifies with `key` (the receiver's check)."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    for entry in headers["webhook-signature"].split(" "):
        version, _, signature = entry.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature), signed)
        except InvalidSignature:
            continue
        return True
    return False


def versions(headers: dict[str, str]) -> list[str]:
    return [entry.partition(",")[0] for entry in headers["webhook-signature"].split(" ")]


# --- deliveries ------------------------------------------------------------------------------


def test_ed25519_only_signs_v1a_verified_with_the_jwks_key_and_sends_no_hmac(make_app, receiver):
    app = app_with(make_app, "ed25519")
    headers = deliver_one(app, receiver)
    body = receiver.received[-1].body
    assert versions(headers) == ["v1a"]
    assert "x-dify-signature-v1" not in headers  # the receiver holds no secret
    (key,) = published_keys(app.application.id).values()
    assert verifies(key, headers, body)
    assert json.loads(body)["output"] == {"answer": "退款 ✓"}
    # A tampered body, id or timestamp fails; the secret verifies nothing.
    assert not verifies(key, headers, body.replace(b'"run":1', b'"run":2'))
    assert not verifies(key, headers | {"webhook-id": headers["webhook-id"] + "x"}, body)
    later = str(int(headers["webhook-timestamp"]) + 1)
    assert not verifies(key, headers | {"webhook-timestamp": later}, body)
    with pytest.raises(WebhookVerificationError):
        Webhook(app.webhook_secret).verify(body, headers)


def test_both_signs_v1_and_v1a_each_verified_by_its_stock_library(make_app, receiver):
    app = app_with(make_app, "both")
    headers = deliver_one(app, receiver)
    body = receiver.received[-1].body
    assert versions(headers) == ["v1", "v1a"]
    assert Webhook(app.webhook_secret).verify(body, headers)["status"] == "succeeded"
    expected = hmac.new(app.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-dify-signature-v1"], expected)
    (key,) = published_keys(app.application.id).values()
    assert verifies(key, headers, body)


def test_hmac_is_the_default_and_publishes_no_key(make_app, receiver):
    app = make_app("echo")
    headers = deliver_one(app, receiver)
    assert versions(headers) == ["v1"] and "x-dify-signature-v1" in headers
    assert published_keys(app.application.id) == {}
    assert Application.objects.get(pk=app.application.id).signing_key == ""  # none made


def test_an_ed25519_row_without_a_key_still_signs_with_the_secret(make_app, receiver):
    app = make_app("echo", signing="ed25519")  # set behind the services' back: no key made
    headers = deliver_one(app, receiver)
    assert versions(headers) == ["v1"] and "x-dify-signature-v1" in headers
    Webhook(app.webhook_secret).verify(receiver.received[-1].body, headers)
    assert published_keys(app.application.id) == {}


def test_rotation_keeps_the_old_key_listed_and_signing_during_the_grace_only(make_app, receiver):
    app = app_with(make_app, "ed25519")
    (old_kid,) = published_keys(app.application.id)
    new_kid = rotate_signing_key(application_id=app.application.id, grace_hours=1)
    assert new_kid != old_kid and new_kid.startswith("ed25519_")

    keys = published_keys(app.application.id)
    assert set(keys) == {old_kid, new_kid}
    headers = deliver_one(app, receiver)
    body = receiver.received[-1].body
    assert versions(headers) == ["v1a", "v1a"]
    assert verifies(keys[new_kid], headers, body) and verifies(keys[old_kid], headers, body)

    # After the grace period (moved into the past; updated_at tells the workers' caches) only
    # the new key signs and is listed.
    Application.objects.filter(pk=app.application.id).update(
        previous_signing_key_expires_at=timezone.now() - timedelta(seconds=1),
        updated_at=timezone.now(),
    )
    assert set(published_keys(app.application.id)) == {new_kid}
    headers = deliver_one(app, receiver)
    body = receiver.received[-1].body
    assert versions(headers) == ["v1a"]
    assert verifies(keys[new_kid], headers, body) and not verifies(keys[old_kid], headers, body)


def test_rotation_without_grace_drops_the_old_key_at_once(make_app, receiver):
    app = app_with(make_app, "both")
    (old_kid,) = published_keys(app.application.id)
    new_kid = rotate_signing_key(application_id=app.application.id, grace_hours=0)
    assert new_kid != old_kid
    assert set(published_keys(app.application.id)) == {new_kid}
    headers = deliver_one(app, receiver)
    assert versions(headers) == ["v1", "v1a"]


def test_a_grace_shorter_than_the_jwks_cache_is_refused_and_changes_nothing(make_app):
    """Receivers may cache the JWKS for its max-age: the old key must sign at least that long,
    unless it is dropped at once (0, for a key that leaked)."""
    app = app_with(make_app, "ed25519")
    (old_kid,) = published_keys(app.application.id)
    with pytest.raises(InvalidApplication, match="at least") as refused:
        rotate_signing_key(application_id=app.application.id, grace_hours=0.05)  # 180 s
    assert refused.value.field == "grace_hours"
    with pytest.raises(CommandError, match=r"^--grace-hours: must be 0 .* \(300 s"):
        call_command("rotatesigningkey", str(app.application.id), "--grace-hours", "0.01",
                     stdout=StringIO())  # fmt: skip
    assert set(published_keys(app.application.id)) == {old_kid}
    assert not AuditEntry.objects.filter(action="application.rotate_signing_key").exists()
    rotate_signing_key(application_id=app.application.id, grace_hours=300 / 3600)  # the least


def test_a_batch_finished_callback_is_signed_the_same_way(make_app, receiver, private_queues):
    app = app_with(make_app, "ed25519")
    items = [{"inputs": {"n": n}} for n in range(2)]
    batch_id = submit_batch(Client(), app, items, callback_url=receiver.url)["batch_id"]
    Task.objects.filter(batch_id=batch_id).update(status="succeeded", finished_at=timezone.now())
    completion.settle(batch_id=batch_id)
    assert batch_callbacks.deliver(batch_id=batch_id, completion=1, attempt=1) == "delivered"
    (request,) = receiver.received
    headers = lowered(request)
    assert versions(headers) == ["v1a"] and "x-dify-signature-v1" not in headers
    (key,) = published_keys(app.application.id).values()
    assert verifies(key, headers, request.body)
    assert json.loads(request.body)["event"] == "batch.finished"


# --- the JWKS --------------------------------------------------------------------------------


def test_jwks_shape_caching_and_what_it_lists(make_app):
    ed = app_with(make_app, "ed25519")
    both = app_with(make_app, "both")
    make_app("echo")  # hmac only: not listed
    switched = app_with(make_app, "ed25519")
    update_application(application_id=switched.application.id, signing="hmac")

    response = Client().get(JWKS_URL)  # no credentials: public
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "public, max-age=300"
    keys = response.json()["keys"]
    assert [key["taskhook_app_id"] for key in keys] == [str(ed.application.id),
                                                         str(both.application.id)]  # fmt: skip
    for key, app in zip(keys, (ed, both), strict=True):
        row = Application.objects.get(pk=app.application.id)
        assert set(key) == {"kty", "crv", "x", "kid", "use", "alg", "taskhook_app_id"}
        assert (key["kty"], key["crv"], key["use"], key["alg"]) == ("OKP", "Ed25519", "sig",
                                                                    "EdDSA")  # fmt: skip
        assert key["kid"] == row.signing_key_id
        assert "=" not in key["x"] and len(base64.urlsafe_b64decode(key["x"] + "=")) == 32
        assert row.signing_key.removeprefix("whsk_") not in response.content.decode()
    # A key id is unique, and the private key is never what is published.
    assert len({key["kid"] for key in keys}) == 2


def test_jwks_is_one_query_however_many_applications(make_app):
    app_with(make_app, "ed25519")
    with CaptureQueriesContext(connection) as one:
        Client().get(JWKS_URL)
    for _ in range(4):
        app = app_with(make_app, "both")
        rotate_signing_key(application_id=app.application.id, grace_hours=1)
    with CaptureQueriesContext(connection) as many:
        response = Client().get(JWKS_URL)
    assert len(response.json()["keys"]) == 1 + 4 * 2
    assert len(many.captured_queries) == len(one.captured_queries) == 1


def test_jwks_refuses_other_methods_with_the_api_error_shape():
    response = Client().post(JWKS_URL)
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"


# --- the setting and the commands -------------------------------------------------------------


def setapplication(app_id, *args: str) -> str:
    out = StringIO()
    call_command("setapplication", str(app_id), *args, stdout=out)
    return out.getvalue()


def test_setapplication_signing_makes_a_key_once_and_prints_it(make_app):
    app = make_app("echo")
    out = setapplication(app.application.id, "--signing", "both")
    row = Application.objects.get(pk=app.application.id)
    assert row.signing == "both" and row.signing_key.startswith("whsk_")
    assert f"signing                both (key {row.signing_key_id}" in out
    setapplication(app.application.id, "--signing", "ED25519")  # case is forgiven
    setapplication(app.application.id, "--signing", "hmac")
    setapplication(app.application.id, "--signing", "ed25519")
    again = Application.objects.get(pk=app.application.id)
    assert again.signing == "ed25519"
    assert (again.signing_key, again.signing_key_id) == (row.signing_key, row.signing_key_id)


@pytest.mark.parametrize("value", ["rsa", "", "hmac,ed25519"])
def test_setapplication_refuses_a_bad_signing_and_changes_nothing(make_app, value):
    app = make_app("echo")
    before = Application.objects.get(pk=app.application.id)
    with pytest.raises(CommandError, match=r"^--signing: must be one of hmac, ed25519, both"):
        setapplication(app.application.id, "--signing", value, "--retention-hours", "48")
    after = Application.objects.get(pk=app.application.id)
    assert (after.signing, after.signing_key, after.retention_hours, after.updated_at) == (
        "hmac", "", before.retention_hours, before.updated_at)  # fmt: skip


def test_createapplication_with_ed25519_publishes_its_key_at_once():
    out = StringIO()
    call_command("createapplication", "pk-app", "--runner", "echo", "--signing", "ed25519",
                 "--json", stdout=out)  # fmt: skip
    app_id = json.loads(out.getvalue())["app_id"]
    row = Application.objects.get(pk=app_id)
    assert row.signing == "ed25519"
    assert list(published_keys(app_id)) == [row.signing_key_id]


def test_rotatesigningkey_prints_the_new_kid_and_refuses_an_hmac_application(make_app):
    hmac_only = make_app("echo")
    with pytest.raises(CommandError, match=r"^--signing: the application signs with HMAC only"):
        call_command("rotatesigningkey", str(hmac_only.application.id), stdout=StringIO())
    app = app_with(make_app, "ed25519")
    (old_kid,) = published_keys(app.application.id)
    out, err = StringIO(), StringIO()
    call_command("rotatesigningkey", str(app.application.id), "--grace-hours", "2",
                 stdout=out, stderr=err)  # fmt: skip
    new_kid = out.getvalue().strip()
    assert set(published_keys(app.application.id)) == {old_kid, new_kid}
    assert "2 h" in err.getvalue()


# --- the dashboard ------------------------------------------------------------------------------


def test_the_settings_form_sets_signing_and_the_page_rotates_the_key(operator, make_app):
    from dashboard.ui.forms import ApplicationForm

    app = make_app("echo")
    url = f"/applications/{app.application.id}/"
    row = Application.objects.get(pk=app.application.id)
    form = ApplicationForm(instance=row)
    data = {name: form[name].value() for name in form.fields if form[name].value() is not None}
    data |= {"runner_config": "{}", "signing": "both"}
    assert operator.post(url, data).status_code in (200, 302)
    row = Application.objects.get(pk=app.application.id)
    assert row.signing == "both" and row.signing_key_id
    page = operator.get(url).content.decode()
    assert row.signing_key_id in page and "Rotate signing key" in page
    assert row.signing_key.removeprefix("whsk_") not in page

    response = operator.post(f"{url}rotate-signing-key", {"grace_hours": "24"},
                             HTTP_HX_REQUEST="true")  # fmt: skip
    body = response.content.decode()
    new_kid = Application.objects.get(pk=app.application.id).signing_key_id
    assert response.status_code == 200 and new_kid in body and "shown only this once" not in body
    assert set(published_keys(app.application.id)) == {row.signing_key_id, new_kid}
    assert "application.rotate_signing_key" in AuditEntry.objects.values_list("action", flat=True)


def test_the_page_refuses_a_signing_key_rotation_for_an_hmac_application(operator, make_app):
    app = make_app("echo")
    url = f"/applications/{app.application.id}/"
    assert "Rotate signing key" not in operator.get(url).content.decode()
    response = operator.post(f"{url}rotate-signing-key", {"grace_hours": "0"})
    assert response.status_code == 400 and "HMAC only" in response.content.decode()
    assert Application.objects.get(pk=app.application.id).signing_key == ""


# --- through a real worker ---------------------------------------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize(("signing", "expected"), [("ed25519", ["v1a"]), ("both", ["v1", "v1a"])])
def test_a_worker_signs_with_the_key_the_jwks_publishes(
    make_app, live_worker, receiver, signing, expected
):
    app = app_with(make_app, signing)
    body = {"inputs": {"q": 1}, "response_mode": "async", "callback_url": receiver.url}
    task_id = api_submit(app, body)
    wait_for(lambda: Task.objects.filter(pk=task_id, callback_status="delivered").first(), 30)
    request = receiver.received[0]
    headers = lowered(request)
    assert versions(headers) == expected
    (key,) = published_keys(app.application.id).values()
    assert verifies(key, headers, request.body)
    if signing == "both":
        assert Webhook(app.webhook_secret).verify(request.body, headers)["task_id"] == task_id
    else:
        assert "x-dify-signature-v1" not in headers


@pytest.mark.processes
def test_a_worker_signs_intermediate_webhooks_with_ed25519_too(make_app, live_worker, receiver):
    app = app_with(make_app, "ed25519")
    task_id = api_submit(app, {"inputs": {"q": 1}, "response_mode": "async",
                               "callback_url": receiver.url,
                               "callback_events": ["started", "finished"]})  # fmt: skip
    wait_for(lambda: Task.objects.filter(pk=task_id, callback_status="delivered").first(), 30)
    wait_for(lambda: len(receiver.received) >= 2)
    (key,) = published_keys(app.application.id).values()
    events = []
    for request in receiver.received:
        headers = lowered(request)
        assert versions(headers) == ["v1a"] and "x-dify-signature-v1" not in headers
        assert verifies(key, headers, request.body)
        events.append(json.loads(request.body)["event"])
    assert events[0] == "task.started" and "task.finished" in events
