"""The OpenAPI document (docs/openapi.json) against the server: it is served as written, it is a
valid OpenAPI 3.1 document, and schemathesis fuzzes a live gunicorn + worker against it."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import jsonschema_rs
import pytest
import requests
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tasks.applications import create_application
from tasks.models import Application, Task
from tests.conftest import BASE_DIR, Client, wait_for_status
from tests.stack import Stack

DOCUMENT = BASE_DIR / "docs" / "openapi.json"
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]
MAX_EXAMPLES = 50  # fuzzed cases per operation, besides the examples and coverage phases


def load_document() -> dict:
    return json.loads(DOCUMENT.read_text(encoding="utf-8"))


def _schema_objects(node, path: str = "#") -> Iterator[tuple[str, dict]]:
    """Every Schema Object in the document (the values of `schema` keys and of
    components.schemas), with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}/{key}"
            if isinstance(value, dict) and (key == "schema" or path == "#/components/schemas"):
                yield here, value
            yield from _schema_objects(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _schema_objects(value, f"{path}/{index}")


@pytest.mark.django_db
def test_document_is_served_as_written_and_is_valid_openapi_3_1():
    response = Client().get("/api/openapi.json")  # no API key
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    document = load_document()
    assert response.json() == document
    assert (
        DOCUMENT.read_text(encoding="utf-8")
        == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    ), "docs/openapi.json is pretty-printed with 2 spaces"

    assert document["openapi"].startswith("3.1.")
    assert [server["url"] for server in document["servers"]] == ["/"]  # right behind any host
    # The OpenAPI 3.1 meta-schema, then each Schema Object against JSON Schema 2020-12 (the
    # OpenAPI 3.1 dialect only adds annotation keywords to it).
    schemathesis.openapi.from_dict(document).validate()
    for where, subschema in _schema_objects(document):
        assert jsonschema_rs.meta.is_valid(subschema), where
    # Every operation the server routes under /api/ is in the document, and only those.
    operations = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}  # fmt: skip
    assert operations == {
        ("POST", "/api/applications/{app_id}/generate"),
        ("GET", "/api/tasks/{task_id}"),
        ("GET", "/api/tasks/{task_id}/events"),
        ("POST", "/api/tasks/{task_id}/cancel"),
        ("POST", "/api/applications/{app_id}/batches"),
        ("GET", "/api/batches/{batch_id}"),
        ("GET", "/api/batches/{batch_id}/results"),
        ("GET", "/api/batches/{batch_id}/events"),
        ("POST", "/api/batches/{batch_id}/cancel"),
        ("GET", "/api/openapi.json"),
    }


@pytest.mark.django_db
def test_document_endpoint_refuses_other_methods():
    response = Client().post("/api/openapi.json", data="{}", content_type="application/json")
    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


# --- schemathesis against a live server ---------------------------------------------------------

# The document as written; the fuzzer sends its requests to the live server of `fuzz_target`.
schema = schemathesis.openapi.from_path(DOCUMENT)
schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")
# The event stream of an unfinished task stays open until the task finishes: it is checked
# against the document below (test_answers_the_fuzzer_rarely_reaches_conform), not fuzzed.
fuzzed = schema.exclude(operation_id="streamTaskEvents")
# Repros show the Idempotency-Key (the default markers would filter any header named "…key…");
# the API key stays filtered by its header name, Authorization.
_sanitization = schema.config.output.sanitization
_sanitization.sensitive_markers = tuple(m for m in _sanitization.sensitive_markers if m != "key")


@schemathesis.serializer("application/x-ndjson")
def ndjson_lines(ctx, value) -> bytes:
    """A batch's NDJSON body: the document gives its lines as an array, an element a line. A
    value that is no array has no lines: it goes as one line that is not an object."""
    if isinstance(value, bytes):
        return value
    lines = value if isinstance(value, list) else [[value]]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


# Real ids for the path parameters, filled in by `fuzz_target` before the first case is drawn.
REAL_IDS: dict[str, list[str]] = {}
# (operation, status) -> how many answers, to show that the fuzzer got past 404.
SEEN: Counter[tuple[str, int]] = Counter()
FAILED_OPERATIONS: set[str] = set()
# The path parameters' `example`s in the document.
PLACEHOLDER_IDS = {
    parameter["name"]: parameter["example"]
    for parameter in load_document()["components"]["parameters"].values()
    if parameter["in"] == "path"
}
IDEMPOTENCY_KEY_EXAMPLE = load_document()["components"]["parameters"]["IdempotencyKey"]["example"]


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Draw path parameters from real ids too, so that the fuzzer gets past 404 to the bodies and
    to real tasks. (Any string is a valid id in the document, so a swap keeps a case valid.)"""
    choices = [path_parameters]
    for name in path_parameters or {}:
        choices += [{**path_parameters, name: real} for real in REAL_IDS.get(name, [])]
    return st.sampled_from(choices)


@dataclass
class FuzzTarget:
    stack: Stack
    app_id: str
    api_key: str
    task_ids: list[str]
    batch_ids: list[str]

    def __post_init__(self) -> None:
        self.real_ids = {"app_id": itertools.cycle([self.app_id]),
                         "task_id": itertools.cycle(self.task_ids),
                         "batch_id": itertools.cycle(self.batch_ids)}  # fmt: skip
        self.serial = itertools.count(1)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory, django_db_setup) -> Iterator[Stack]:
    """gunicorn and a worker on the test database, with a Redis of their own, shared by the
    operations' tests. Only the tasks queue has a worker: deliveries of the callbacks the fuzzer
    submits wait on a queue nobody reads, so no fuzzed URL is ever called."""
    stack = Stack(tmp_path_factory.mktemp("openapi"))
    try:
        stack.start_redis()
        stack.start_web()
        stack.start_worker("openapi", ("tasks",))
        yield stack
    finally:
        stack.close()


@pytest.fixture
def fuzz_target(fuzz_stack: Stack, transactional_db) -> Iterator[FuzzTarget]:
    """An echo application and tasks in each state, committed for the live processes to see."""
    created = create_application(name="openapi-fuzz", runner="echo")
    app = created.application
    # A generous bucket (this is not a rate limit test) and short blocking waits.
    Application.objects.filter(pk=app.pk).update(
        rate_limit_per_second=10_000, rate_limit_burst=10_000, blocking_timeout_seconds=2
    )
    now = timezone.now()
    task_ids = [
        str(Task.objects.create(application=app, status=status, inputs={"n": n}, **fields).id)
        for n, (status, fields) in enumerate([
            ("pending", {}),
            ("pending", {}),
            ("running", {"started_at": now, "progress": 40}),
            ("succeeded", {"started_at": now - timedelta(seconds=1), "finished_at": now,
                           "output": {"n": 3}, "progress": 100}),
            ("failed", {"started_at": now - timedelta(seconds=1), "finished_at": now,
                        "error": "runner raised ValueError"}),
        ])
    ]  # fmt: skip
    # One task through the worker (it is up once it ran one): one more real id.
    response = requests.post(
        f"{fuzz_stack.base_url}/api/applications/{app.id}/generate",
        json={"inputs": {"warm": "up"}, "response_mode": "blocking"},
        headers={"Authorization": f"Bearer {created.api_key}"},
        timeout=10,
    )
    assert response.status_code in (200, 202), response.text
    task_ids.append(response.json()["task_id"])
    wait_for_status(task_ids[-1], ("succeeded",), timeout=30)
    # The live server serves the document as written.
    served = requests.get(f"{fuzz_stack.base_url}/api/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["Content-Type"] == "application/json"
    assert served.json() == load_document()
    # A batch through the live server: its id is a real one too.
    batch = requests.post(
        f"{fuzz_stack.base_url}/api/applications/{app.id}/batches",
        json={"items": [{"inputs": {"n": n}} for n in range(3)]},
        headers={"Authorization": f"Bearer {created.api_key}"},
        timeout=10,
    )
    assert batch.status_code == 200, batch.text
    batch_ids = [batch.json()["batch_id"]]
    REAL_IDS.update(app_id=[str(app.id)], task_id=task_ids, batch_id=batch_ids)
    yield FuzzTarget(fuzz_stack, str(app.id), created.api_key, task_ids, batch_ids)
    REAL_IDS.clear()


def drops_the_api_key(case) -> bool:
    """A negative case that leaves out the Authorization header the document requires (its
    security): putting our key back would make it a valid request that the server accepts."""
    data = case.meta.phase.data if case.meta is not None else None
    return any(
        mutation.parameter_location == ParameterLocation.HEADER
        and "required" in mutation.keywords
        and "Authorization" in (mutation.parameter, mutation.original_value)
        for mutation in getattr(data, "mutations", ())
    )


@pytest.mark.django_db(transaction=True)
@fuzzed.parametrize()
# `fuzz_target` is set up once per operation, not per example, and that is what it is for.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_server_conforms_to_its_openapi_document(case, fuzz_target):
    # The examples and coverage phases send the document's example ids: make them real ones.
    for name, value in (case.path_parameters or {}).items():
        if value == PLACEHOLDER_IDS.get(name):
            case.path_parameters[name] = next(fuzz_target.real_ids[name])
    # ... and the same Idempotency-Key with each body: a fresh (still valid) key gets past 409.
    if (case.headers or {}).get("Idempotency-Key") == IDEMPOTENCY_KEY_EXAMPLE:
        case.headers["Idempotency-Key"] = f"{IDEMPOTENCY_KEY_EXAMPLE}-{next(fuzz_target.serial)}"
    # The API key goes with every case, except one whose invalid part is its missing key.
    api_key = {} if drops_the_api_key(case) else {"Authorization": f"Bearer {fuzz_target.api_key}"}
    try:
        response = case.call_and_validate(
            base_url=fuzz_target.stack.base_url,
            headers=api_key,
            checks=CHECKS,
            timeout=15,
        )
    except BaseException:
        FAILED_OPERATIONS.add(case.operation.label)
        raise
    SEEN[case.operation.label, response.status_code] += 1


@pytest.mark.django_db(transaction=True)
def test_answers_the_fuzzer_rarely_reaches_conform(fuzz_stack):
    """A blocking submit that times out (202), polls and cancels of a running task, an
    idempotent replay, and the limits, each checked against the document."""
    created = create_application(name="openapi-slow", runner="sleep")
    app_id = created.application.id
    Application.objects.filter(pk=app_id).update(
        rate_limit_per_second=10_000, rate_limit_burst=10_000, blocking_timeout_seconds=0.3
    )
    base = fuzz_stack.base_url
    auth = {"Authorization": f"Bearer {created.api_key}"}
    submit = schema["/api/applications/{app_id}/generate"]["POST"]
    poll = schema["/api/tasks/{task_id}"]["GET"]
    cancel = schema["/api/tasks/{task_id}/cancel"]["POST"]

    def call(operation, method, path, expected, **kwargs):
        response = requests.request(method, base + path, headers=auth | kwargs.pop("headers", {}),
                                    timeout=15, **kwargs)  # fmt: skip
        assert response.status_code == expected, response.text
        operation.validate_response(response)
        return response

    generate = f"/api/applications/{app_id}/generate"
    slow = call(submit, "POST", generate, 202, json={"inputs": {"seconds": 5}})
    assert int(slow.headers["Retry-After"]) >= 1
    task_id = slow.json()["task_id"]
    wait_for_status(task_id, ("running",))
    running = call(poll, "GET", f"/api/tasks/{task_id}", 200)
    assert running.json()["status"] == "running" and "Retry-After" in running.headers
    assert call(cancel, "POST", f"/api/tasks/{task_id}/cancel", 200).json()["status"] == "cancelled"
    call(cancel, "POST", f"/api/tasks/{task_id}/cancel", 409)

    replay = {"json": {"inputs": {"seconds": 0}, "response_mode": "async"},
              "headers": {"Idempotency-Key": "replay"}}  # fmt: skip
    first = call(submit, "POST", generate, 200, **replay).json()
    assert call(submit, "POST", generate, 200, **replay).json()["task_id"] == first["task_id"]
    call(submit, "POST", generate, 409, json={"inputs": {"other": 1}},
         headers={"Idempotency-Key": "replay"})  # fmt: skip
    call(submit, "POST", generate, 413, data=b"{" + b" " * (1024 * 1024) + b"}",
         headers={"Content-Type": "application/json"})  # fmt: skip
    call(submit, "POST", generate, 415, data=b"{}", headers={"Content-Type": "text/plain"})
    call(submit, "POST", generate, 400, data=b'{"inputs": {"x": NaN}}',
         headers={"Content-Type": "application/json"})  # fmt: skip
    call(submit, "POST", generate, 401, json={"inputs": {}}, headers={"Authorization": "Bearer x"})
    call(poll, "GET", f"/api/tasks/{uuid.uuid4()}", 404)

    # The event stream: a finished task's is its task.finished at once; the errors come first.
    events = schema["/api/tasks/{task_id}/events"]["GET"]
    path = f"/api/tasks/{task_id}/events"
    finished = call(events, "GET", path, 200)
    assert finished.headers["Content-Type"].startswith("text/event-stream")
    last_id = next(line[4:] for line in finished.text.splitlines() if line.startswith("id: "))
    call(events, "GET", path, 204, headers={"Last-Event-ID": last_id})
    call(events, "GET", f"{path}?after=soon", 400)
    call(events, "GET", path, 401, headers={"Authorization": "Bearer x"})
    call(events, "GET", f"/api/tasks/{uuid.uuid4()}/events", 404)
    token = slow.json()["stream_url"].split("token=")[1]
    call(poll, "GET", f"/api/tasks/{task_id}?token={token}", 200, headers={"Authorization": ""})


def test_the_fuzzer_got_past_404_to_bodies_and_real_tasks():
    if not SEEN or FAILED_OPERATIONS:
        pytest.skip("the operations' tests did not run, or failed (see there)")
    answered = set(SEEN)
    for expected in [
        ("POST /api/applications/{app_id}/generate", 200),
        ("POST /api/applications/{app_id}/generate", 400),
        ("GET /api/tasks/{task_id}", 200),
        ("POST /api/tasks/{task_id}/cancel", 200),
        ("POST /api/tasks/{task_id}/cancel", 409),
        ("POST /api/applications/{app_id}/batches", 200),
        ("POST /api/applications/{app_id}/batches", 400),
        ("GET /api/batches/{batch_id}", 200),
        ("GET /api/batches/{batch_id}/results", 200),
    ]:
        assert expected in answered, (expected, dict(SEEN))
