"""tasks.jsonsafety: every refusal names its path; the edge values that must be accepted."""

from __future__ import annotations

import json

import pytest

from tasks import jsonsafety as js


def refusal(raw: bytes, path: str = "inputs") -> js.UnstorableJson:
    with pytest.raises(js.UnstorableJson) as info:
        js.check_value(js.loads(raw), path)
    return info.value


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        (b'{"a": NaN}', "inputs.a", "NaN is not a JSON number"),
        (b'{"a": [1, Infinity]}', "inputs.a[1]", "Infinity is not a JSON number"),
        (b'{"a": {"b": -Infinity}}', "inputs.a.b", "-Infinity is not a JSON number"),
        (b'{"x": 1e999}', "inputs.x", "outside the range of a float"),
        (b'{"x": -1e999}', "inputs.x", "outside the range of a float"),
        (b'{"x": 1e-400}', "inputs.x", "too small for a float"),
        (b'{"x": -0.000001e-400}', "inputs.x", "too small for a float"),
        (b'{"n": ' + b"9" * 309 + b"}", "inputs.n", "outside the range of a float"),
        (b'{"n": -' + b"9" * 309 + b"}", "inputs.n", "outside the range of a float"),
        (b'{"s": "a\\u0000b"}', "inputs.s", "NUL character"),
        (b'{"s": ["ok", "\\ud800"]}', "inputs.s[1]", "lone surrogate (\\ud800)"),
        (b'{"s": "\\udfff"}', "inputs.s", "lone surrogate (\\udfff)"),
        (b'{"k": {"\\ud83d": 1}}', "inputs.k", "a key contains a lone surrogate"),
        (b'{"k": {"a\\u0000": 1}}', "inputs.k", "a key contains a NUL character"),
    ],
)
def test_refusals_name_their_path(raw, path, reason):
    error = refusal(raw)
    assert error.path == path
    assert reason in error.reason
    assert str(error) == f"{path}: {error.reason}"


def test_refusal_at_the_top_has_no_path_prefix():
    error = refusal(b"NaN", path="")
    assert error.path == "" and str(error) == "NaN is not a JSON number"
    error = refusal(b'{"a": NaN}', path="")
    assert error.path == "a"


def test_long_int_edge():
    ok = b"9" * 308
    assert js.loads(ok) == int(ok)
    js.check_value(js.loads(ok), "x")
    with pytest.raises(js.UnstorableJson, match="outside the range"):
        js.check_value(js.loads(b"9" * 309), "x")


def test_python_values_are_checked_too():
    for value, reason in [
        (float("nan"), "nan is not a JSON number"),
        (float("inf"), "inf is not a JSON number"),
        (10**400, "outside the range of a float"),
        ({1: "a"}, "the key 1 is not a string"),
        ({"a": {1, 2}}, "a set is not a JSON value"),
        (b"bytes", "a bytes is not a JSON value"),
    ]:
        with pytest.raises(js.UnstorableJson) as info:
            js.check_value(value, "output")
        assert reason in info.value.reason


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_depth_64_is_accepted_and_65_refused():
    js.check_value(js.loads(nested(64)), "inputs")
    error = refusal(nested(65))
    assert error.reason == "nested deeper than 64 levels"
    assert error.path == "inputs" + "[0]" * 64
    deep_object = b'{"a":' * 65 + b"1" + b"}" * 65
    assert refusal(deep_object).path == "inputs" + ".a" * 64


def test_recursion_error_is_a_refusal_not_a_crash():
    with pytest.raises(js.UnstorableJson) as info:
        js.loads(nested(200_000))
    assert info.value.path == "" and "nested deeper than 64 levels" in info.value.reason


def test_invalid_utf8_names_the_byte():
    with pytest.raises(js.UnstorableJson) as info:
        js.loads(b'{"a": "\xff"}')
    assert info.value.reason == "the body is not valid UTF-8 (byte 7)"
    with pytest.raises(js.UnstorableJson, match="byte 0"):
        js.loads(b"\xed\xa0\x80")  # a surrogate encoded as UTF-8 (CESU): not UTF-8


def test_invalid_json_is_a_plain_value_error():
    with pytest.raises(ValueError) as info:
        js.loads(b'{"a": ')
    assert not isinstance(info.value, js.UnstorableJson)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"5e-324", 5e-324),
        (b"-0.0", -0.0),
        (b"0e5", 0.0),
        (b"0.000", 0.0),
        (b"-0", 0),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        ('"🎉 é ☃"'.encode(), "🎉 é ☃"),
        (b'"\\ud83c\\udf89"', "🎉"),  # a surrogate pair is one character
        (b'{"\xf0\x9f\x8e\x89": [true, false, null]}', {"🎉": [True, False, None]}),
    ],
)
def test_edge_values_are_accepted(raw, expected):
    value = js.loads(raw)
    js.check_value(value, "inputs")
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, float):
        assert json.dumps(value) == json.dumps(expected)  # -0.0 stays -0.0


def test_clean_text():
    assert js.clean_text("plain ☃") == "plain ☃"
    assert js.clean_text("a\x00b\ud800c\udfffd") == "a\ufffdb\ufffdc\ufffdd"
    assert js.clean_text("🎉") == "🎉"
    cleaned = js.clean_text("x\x00")
    js.check_value(cleaned, "error")
    cleaned.encode("utf-8")


def test_the_first_problem_in_document_order_is_named():
    with pytest.raises(js.UnstorableJson) as caught:
        js.check_value({"a": [1, float("nan"), float("nan")], "b": "\x00"}, "inputs")
    assert caught.value.path == "inputs.a[1]"


def test_values_the_quick_check_is_unsure_of_get_the_full_rules():
    """check_value's path-free pass says yes only for plain JSON types; anything else (a
    subclass, a tuple, a bool inside) is decided by the rules that name the place."""
    from collections import OrderedDict

    class Text(str):
        pass

    js.check_value(OrderedDict(a=[True, None, 1.5, (2, "x")], b=Text("fine")), "inputs")
    with pytest.raises(js.UnstorableJson) as refused:
        js.check_value(OrderedDict(a=[Text("bad\x00")]), "inputs")
    assert refused.value.path == "inputs.a[0]"
    with pytest.raises(js.UnstorableJson) as refused:
        js.check_value({"a": {"b": float("nan")}}, "inputs")
    assert refused.value.path == "inputs.a.b"


@pytest.mark.parametrize(
    "value",
    [
        {"q": 1, "text": "tab\tnew\nline \\ ü 😀", "n": [1.5, 1e16, -0.0, None, True]},
        {"big": 10**40, "nested": [{"deep": [10**19]}]},  # beyond 64 bits: json's encoder
        [],
    ],
)
def test_dumps_bytes_is_json_that_decodes_to_the_value(value):
    assert json.loads(js.dumps_bytes(value)) == value
