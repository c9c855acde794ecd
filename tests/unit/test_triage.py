"""tasks.triage: which errors are one group, and which never are (no database)."""

from __future__ import annotations

import uuid

import pytest

from tasks import triage


def same(a: str, b: str) -> bool:
    return triage.task_error(a).fingerprint == triage.task_error(b).fingerprint


def test_timeouts_that_differ_only_in_duration_and_task_id_group_together():
    a = f"TimeoutError: upstream took 31.2 s for task {uuid.uuid4()}"
    b = f"TimeoutError: upstream took 12.0 s for task {uuid.uuid4()}"
    assert same(a, b)
    assert triage.task_error(a).label == "TimeoutError: upstream took <n> s for task <id>"


def test_different_exception_types_never_group():
    message = "upstream took 3 s"
    assert not same(f"TimeoutError: {message}", f"ConnectionError: {message}")
    assert not same(f"TimeoutError: {message}", message)  # typed vs untyped
    assert not same("ValueError: bad", "valueerror: bad")
    # The type is kept verbatim: digits inside it are not masked.
    assert triage.task_error("HTTP2Error: stream 5 reset").label == "HTTP2Error: stream <n> reset"
    assert not same("HTTP2Error: x", "HTTP3Error: x")


def test_dotted_exception_types_are_kept():
    label = triage.task_error("urllib3.exceptions.ReadTimeoutError: read timed out (30 s)").label
    assert label == "urllib3.exceptions.ReadTimeoutError: read timed out (<n> s)"


def test_different_messages_of_one_type_are_different_groups():
    assert not same("KeyError: 'email'", "KeyError: 'user_id'")  # plain names are kept
    assert not same("RuntimeError: disk full", "RuntimeError: out of memory")


@pytest.mark.parametrize(
    ("error", "label"),
    [
        ("job 664a96699e904a8fbc35ecd9e14f6eca vanished", "job <id> vanished"),
        ("object 9f0c1ab3de not found", "object <id> not found"),
        ("rq job task-0a1b2c3d4e-3 lost", "rq job task-<id>-<n> lost"),
        ("address 0x7f3a2b at fault", "address <hex> at fault"),
        ("connect to 127.0.0.1:6379 refused", "connect to <n> refused"),
        ("retry in -3 s", "retry in <n> s"),
        ("utf8 codec, md5 sum", "utf8 codec, md5 sum"),  # digits glued to names stay
        ('File "/srv/app/runner.py", line 42, in run', 'File "<s>", line <n>, in run'),
        ("at runner.py:118", "at runner.py:<n>"),
        ("GET https://api.example.com/v1/items?id=5&token=abc failed",
         "GET https://api.example.com/v1/items?<q> failed"),
        ("invalid literal for int() with base 10: 'x-12'",
         "invalid literal for int() with base <n>: '<s>'"),
        ("  many   spaces\there ", "many spaces here"),
        ("deadbeef is a word, cafe too", "deadbeef is a word, cafe too"),
    ],
)  # fmt: skip
def test_masking(error, label):
    assert triage.task_error(error).label == label


def test_only_the_first_line_counts():
    a = "RuntimeError: boom\nTraceback (most recent call last):\n  File 'a.py'"
    b = "RuntimeError: boom\nsomething else entirely"
    assert same(a, b)
    assert triage.task_error(a).label == "RuntimeError: boom"


def test_empty_and_huge_errors():
    assert triage.task_error("").label == triage.NO_ERROR
    assert triage.task_error("\n\n  \n").label == triage.NO_ERROR
    assert same("", "   ")
    huge = triage.task_error("ValueError: " + "x" * 10_000)
    assert len(huge.label) == triage.MAX_LABEL


def test_the_reconcilers_and_the_workers_wordings():
    assert same("timed out after 300 s (worker lost)", "timed out after 60 s (worker lost)")
    assert not same("timed out after 300 s (worker lost)", "timed out after 300 s")
    assert same(
        "the result could not be stored: value too long (12000 > 10000)",
        "the result could not be stored: value too long (9 > 1)",
    )


def test_fingerprint_is_16_hex_of_kind_and_text():
    group = triage.task_error("TimeoutError: x")
    assert len(group.fingerprint) == 16
    int(group.fingerprint, 16)
    assert group.kind == triage.TASK
    # The same text as a callback error is another group.
    assert triage.fingerprint(triage.CALLBACK, group.label) != group.fingerprint


def test_callbacks_group_by_http_status_first():
    a = triage.callback_error(status_code=503, error="")
    b = triage.callback_error(status_code=503, error="anything")
    assert a == b and a.label == "HTTP 503" and a.kind == triage.CALLBACK
    assert triage.callback_error(status_code=500).fingerprint != a.fingerprint


def test_callbacks_without_a_status_group_by_the_normalised_error():
    t1 = triage.callback_error(status_code=None, error="timed out after 10 s")
    t2 = triage.callback_error(status_code=None, error="timed out after 3.5 s")
    assert t1 == t2 and t1.label == "timed out after <n> s"
    refused = triage.callback_error(
        status_code=None,
        error="could not connect to 127.0.0.1:4431: ConnectionRefusedError: [Errno 111] refused",
    )
    assert refused.fingerprint != t1.fingerprint
    ssrf_a = triage.callback_error(
        status_code=None, error="refused by the SSRF guard: callback_url host '10.0.0.7' is private"
    )
    ssrf_b = triage.callback_error(
        status_code=None, error="refused by the SSRF guard: callback_url host '10.9.1.1' is private"
    )
    assert ssrf_a == ssrf_b
    # A task error and a callback error of the same text never share a group.
    assert triage.task_error("timed out after 10 s").fingerprint != t1.fingerprint
