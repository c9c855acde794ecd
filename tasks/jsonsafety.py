"""What JSON Taskhook accepts and stores: the one rule, the same on SQLite and PostgreSQL.

A value is storable when both backends keep it exactly and every client can read it back:
no NaN or infinities (not JSON; Python's encoder writes them anyway), no number outside float
range, no NUL character (PostgreSQL's text and jsonb refuse it, SQLite keeps it), no lone
surrogate (not encodable as UTF-8), and no nesting deeper than MAX_DEPTH. Request bodies are
checked with `loads` and `check_value`, runner output with `check_value`, and free text that
only goes to operators (error texts, tracebacks, receivers' answers) is made storable with
`clean_text` instead of refused.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import orjson

MAX_DEPTH = 64
# NUL and the UTF-16 surrogate range, which a decoded `\ud800` escape can leave in a str.
_UNSTORABLE_CHARACTERS = re.compile("[\x00\ud800-\udfff]")
_NONZERO_MANTISSA = re.compile(r"^-?0*\.?0*[1-9]")


class UnstorableJson(ValueError):
    """`path` names where in the value the problem is (e.g. `inputs.items[3]`)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class _Refused:
    """Stands in for a number that cannot be stored, so `check_value` can say where it was."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float | _Refused:
    value = float(text)
    if math.isinf(value):
        return _Refused(f"the number {text[:40]} is outside the range of a float")
    if value == 0 and _NONZERO_MANTISSA.search(text):  # 1e-400: would be stored as 0.0
        return _Refused(f"the number {text[:40]} is too small for a float (it would become 0)")
    return value


def _bounded_int(text: str) -> int | _Refused:
    # Longer than any float's integer part: not representable by most JSON readers.
    if len(text.lstrip("-")) > 308:
        return _Refused(f"the number {text[:40]}… is outside the range of a float")
    return int(text)


def loads(raw: bytes) -> Any:
    """Decode a request body: strict UTF-8, JSON, or UnstorableJson / ValueError. Numbers that
    cannot be stored are left as markers, which `check_value` refuses with their path."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnstorableJson("", f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(
            text,
            parse_constant=_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise UnstorableJson("", f"the body is nested deeper than {MAX_DEPTH} levels") from None


def dumps_bytes(value: Any) -> bytes:
    """UTF-8 JSON of a decoded (storable) value, for a database column: orjson's, several times
    quicker than json's, or json's for what orjson refuses (an integer beyond 64 bits). The two
    differ in whitespace and escapes only, which neither jsonb nor a reader keeps."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode()


def _problem_in_text(text: str) -> str | None:
    found = _UNSTORABLE_CHARACTERS.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (\\u0000), which cannot be stored"
    return f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode"


def check_value(value: Any, path: str) -> None:
    """Raise UnstorableJson naming the first place where `value` is not storable."""
    if not _is_storable(value):
        _name_the_problem(value, path)


def _is_storable(value: Any) -> bool:
    """check_value's rules without the paths, which only a refusal needs (a batch checks
    thousands of values that nearly always pass)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if _UNSTORABLE_CHARACTERS.search(item) is not None:
                return False
        elif kind is dict:
            if depth >= MAX_DEPTH:
                return False
            for key, child in item.items():
                if type(key) is not str or _UNSTORABLE_CHARACTERS.search(key) is not None:
                    return False
                stack.append((child, depth + 1))
        elif kind is list or kind is tuple:
            if depth >= MAX_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in item)
        elif kind is int:
            if abs(item) > sys.float_info.max:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif item is None or kind is bool:
            continue
        else:  # a subclass (bool is one of int's), a marker, anything else: the full rules
            return False
    return True


def _name_the_problem(value: Any, path: str) -> None:
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            problem = _problem_in_text(item)
            if problem:
                raise UnstorableJson(where, problem)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, _Refused):
            raise UnstorableJson(where, item.reason)
        elif isinstance(item, int):
            if abs(item) > sys.float_info.max:
                raise UnstorableJson(where, "the number is outside the range of a float")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise UnstorableJson(where, f"{item} is not a JSON number")
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_DEPTH:
                raise UnstorableJson(where, f"nested deeper than {MAX_DEPTH} levels")
            children: list[tuple[Any, str, int]] = []
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise UnstorableJson(where, f"the key {key!r} is not a string")
                    problem = _problem_in_text(key)
                    if problem:
                        raise UnstorableJson(where, f"a key {problem}")
                    children.append((child, f"{where}.{key}" if where else key, depth + 1))
            else:
                for index, child in enumerate(item):
                    children.append((child, f"{where}[{index}]", depth + 1))
            stack.extend(reversed(children))  # popped in document order: the first problem
        else:
            raise UnstorableJson(where, f"a {type(item).__name__} is not a JSON value")


def clean_text(text: str) -> str:
    """Operator-facing text made storable: NUL and lone surrogates become U+FFFD."""
    if _UNSTORABLE_CHARACTERS.search(text) is None:
        return text
    return _UNSTORABLE_CHARACTERS.sub("\ufffd", text)
