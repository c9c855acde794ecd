"""Bad input gets a 4xx JSON error naming the field and changes nothing, the same on SQLite and
PostgreSQL (the suite runs on both); what was accepted renders in the dashboard; a runner's
output that cannot be stored fails its task instead of leaving it running."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User

from tasks.execution.executor import execute_task
from tasks.jsonsafety import MAX_DEPTH
from tasks.models import Task
from tests.conftest import Client

pytestmark = pytest.mark.django_db


def post_raw(app, body: bytes, **headers):
    return Client().post(
        f"/api/applications/{app.application.id}/generate",
        data=body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
        **headers,
    )


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


REFUSED_BODIES = [
    ('{"inputs": {"x": NaN}}', "inputs", "NaN"),
    ('{"inputs": {"x": [1, -Infinity]}}', "inputs", "-Infinity"),
    ('{"inputs": {"x": Infinity}}', "inputs", "Infinity"),
    ('{"inputs": {"x": 1e999}}', "inputs", "outside the range"),
    ('{"inputs": {"x": -1e400}}', "inputs", "outside the range"),
    ('{"inputs": {"x": 1e-400}}', "inputs", "too small for a float"),
    ('{"inputs": {"x": 1' + "0" * 400 + "}}", "inputs", "outside the range"),
    ('{"inputs": {"x": "a\\u0000b"}}', "inputs", "NUL"),
    ('{"inputs": {"a\\u0000": 1}}', "inputs", "NUL"),
    ('{"inputs": {"x": "\\ud800"}}', "inputs", "surrogate"),
    ('{"inputs": {"x": ["ok", "\\udfff"]}}', "inputs", "surrogate"),
    ('{"inputs": {}, "user": "bob\\u0000"}', "user", "NUL"),
    ('{"inputs": {}, "user": "\\ud83d"}', "user", "surrogate"),
    ('{"inputs": {}, "extra": {"deep": NaN}}', "extra", "NaN"),
    ('{"inputs": {"x": ' + nested(MAX_DEPTH + 1) + "}}", "inputs", "nested deeper"),
    ('{"inputs": {"x": ' + nested(100_000) + "}}", None, "nested deeper"),
]


@pytest.mark.parametrize(("body", "field", "says"), REFUSED_BODIES)
def test_unstorable_json_is_a_400_naming_the_field_and_stores_nothing(make_app, body, field, says):
    app = make_app("echo")
    response = post_raw(app, body.encode())
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert says in error["message"]
    assert not Task.objects.exists()


def test_invalid_utf8_is_a_400(make_app):
    app = make_app("echo")
    response = post_raw(app, b'{"inputs": {"x": "\xff\xfe"}}')
    assert response.status_code == 400
    assert "UTF-8" in response.json()["error"]["message"]
    assert not Task.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1\\x.example.com/hook",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/hook\r\nX-Injected: 1",
        "http://127.0.0.1/\thook",
        "http://127.0.0.1/hook\x7f",
        "http://127.0.0.1/" + "a" * 2048,
        "http:/127.0.0.1/hook",
        "http://@127.0.0.1/hook",
        "http://user@127.0.0.1/hook",
        "//127.0.0.1/hook",
    ],
)
def test_callback_urls_that_parsers_disagree_on_are_refused(make_app, url):
    app = make_app("echo")
    body = json.dumps({"inputs": {}, "response_mode": "async", "callback_url": url})
    response = post_raw(app, body.encode())
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "callback_url"
    assert not Task.objects.exists()


def test_unknown_host_is_a_400_before_anything_is_stored(make_app):
    app = make_app("echo")
    body = json.dumps({"inputs": {}, "response_mode": "async"}).encode()
    response = post_raw(app, body, HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_request",
        "message": "The Host header names no host served here.",
        "field": "Host",
    }
    assert not Task.objects.exists()


def test_an_idempotency_key_with_control_characters_is_refused(make_app):
    app = make_app("echo")
    body = json.dumps({"inputs": {}, "response_mode": "async"}).encode()
    response = post_raw(app, body, HTTP_IDEMPOTENCY_KEY="a\x01b")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "Idempotency-Key"
    assert not Task.objects.exists()


ACCEPTED_INPUTS = {
    "deepest": json.loads(nested(MAX_DEPTH - 2)),
    "largest": 1.7976931348623157e308,
    "smallest": 5e-324,
    "zeros": [0.0, 0e5, -0.0],
    "long_int": int("9" * 300),
    "emoji": "👩‍🚀 ✓ 如何申请退款",
    "markup": "<script>alert(1)</script>{{ not_a_template }}{% now 'Y' %}",
    "empty": ["", {}, [], None, False, 0, -0.0],
}


def test_every_accepted_input_is_stored_and_shown_in_the_dashboard(make_app):
    app = make_app("echo")
    body = json.dumps({"inputs": ACCEPTED_INPUTS, "response_mode": "async", "user": "ü-ser"})
    response = post_raw(app, body.encode())
    assert response.status_code == 200, response.content
    task = Task.objects.get(pk=response.json()["task_id"])
    stored = dict(task.inputs)
    # PostgreSQL's jsonb keeps numbers as decimals and prints 1.79e308 with all its digits.
    assert float(stored.pop("largest")) == ACCEPTED_INPUTS["largest"]
    assert stored == {k: v for k, v in ACCEPTED_INPUTS.items() if k != "largest"}

    staff = Client()
    staff.force_login(User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True))
    page = staff.get(f"/tasks/{task.id}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "👩‍🚀" in html and "&lt;script&gt;" in html and "<script>alert" not in html
    assert "{{ not_a_template }}" in html  # shown as text, never rendered


def nan_output(inputs, ctx):
    return {"score": float("nan")}


def nul_output(inputs, ctx):
    return {"text": "before\x00after"}


def surrogate_output(inputs, ctx):
    return {"text": "\ud800"}


def raises_with_nul(inputs, ctx):
    raise ValueError("upstream said \x00 and \udc80")


@pytest.mark.parametrize(
    ("runner", "says"),
    [
        ("nan_output", "output.score: nan is not a JSON number"),
        ("nul_output", "output.text: contains a NUL character"),
        ("surrogate_output", "output.text: contains a lone surrogate"),
    ],
)
def test_output_that_cannot_be_stored_fails_the_task(make_app, runner, says):
    app = make_app(f"tests.test_hostile_input.{runner}")
    task = Task.objects.create(application=app.application, inputs={})
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    task.refresh_from_db()
    assert task.status == "failed" and task.finished_at is not None
    assert "cannot be stored as JSON" in task.error and says in task.error
    assert task.callback_status == "none"


def test_an_error_text_with_nul_and_surrogates_is_stored(make_app):
    app = make_app("tests.test_hostile_input.raises_with_nul")
    task = Task.objects.create(application=app.application, inputs={})
    assert execute_task(task_id=str(task.id), run=1, worker_name="inline") == "failed"
    task.refresh_from_db()
    assert task.status == "failed"
    assert task.error == "ValueError: upstream said \ufffd and \ufffd"
    assert "\x00" not in task.traceback
