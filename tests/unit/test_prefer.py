"""tasks.api.prefer: the RFC 7240 Prefer header and the wait it asks for."""

from __future__ import annotations

import pytest

from tasks.api import prefer


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("wait=10", {"wait": "10"}),
        ("respond-async, wait=100", {"respond-async": None, "wait": "100"}),
        ("WAIT = 5 ; foo=bar ;baz", {"wait": "5"}),
        ('wait="7", return=minimal', {"wait": "7", "return": "minimal"}),
        ('x="a,b\\"c", wait=3', {"x": 'a,b"c', "wait": "3"}),
        ("wait=1, wait=2", {"wait": "1"}),  # the first instance counts (RFC 7240 section 2)
        (" , wait=4 ,, ", {"wait": "4"}),  # empty list elements are allowed
        ("", {}),
    ],
)
def test_preferences(header, parsed):
    assert prefer.preferences(header) == parsed


@pytest.mark.parametrize(
    "header", ['wait="unterminated', "wait=10 12", "wait=@", "wait=1; =2", "(wait)", "wait=1;;x y"]
)
def test_a_header_that_does_not_parse(header):
    assert prefer.preferences(header) is None
    assert prefer.applied_wait(header, cap=30) is None


@pytest.mark.parametrize(
    ("header", "cap", "wait"),
    [
        ("wait=10", 30, 10),
        ("wait=0", 30, 0),
        ("wait=100", 30, 30),  # capped at the blocking timeout
        ("wait=99999999999999999999999", 30, 30),
        ("wait=10", 2.5, 2),  # whole seconds: what Preference-Applied says is what is waited
        ("wait=10", 0.5, 0),
        ("wait", 30, 30),  # bare, as Replicate takes it: as long as allowed
        ("respond-async, wait=5", 30, 5),
        ("return=minimal", 30, None),
        ("wait=-1", 30, None),
        ("wait=1.5", 30, None),
        ("wait=abc", 30, None),
        ("wait=\u0661", 30, None),  # ARABIC-INDIC DIGIT ONE: a digit, not an ASCII one
        (None, 30, None),
        ("", 30, None),
    ],
)
def test_applied_wait(header, cap, wait):
    assert prefer.applied_wait(header, cap=cap) == wait
