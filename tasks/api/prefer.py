"""`Prefer: wait=N` (RFC 7240): a submit that asks for a blocking answer with its own timeout.

The header is a comma-separated list of preferences, `name[=value][; parameter]...`, the value a
token or a quoted string; names are case-insensitive and the first instance of a name is the
one that counts (RFC 7240, section 2). Only `wait` is acted on: `wait=N` (N whole seconds, >= 0)
waits up to N seconds, capped at the application's blocking timeout; a bare `wait` (as
Replicate's API takes it) waits as long as that cap. Preferences are optional, so a header that
does not parse, or a `wait` whose value is not a number of seconds, is ignored: the submit goes
on as its `response_mode` says. Other preferences (`respond-async`, `return`, ...) are ignored,
which keeps RFC 7240's reading of `respond-async, wait=N`: wait up to N, then answer 202.
"""

from __future__ import annotations

import math
import re

_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # an RFC 9110 token
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_WORD = rf"(?:{_NAME}|{_QUOTED})"
_OWS = r"[ \t]*"
_PARAMETER = rf"{_NAME}(?:{_OWS}={_OWS}{_WORD})?"
# One list element: empty (the list rule allows them), or a preference with its parameters.
_ELEMENT = re.compile(
    rf"{_OWS}(?:({_NAME})(?:{_OWS}={_OWS}({_WORD}))?(?:{_OWS};(?:{_OWS}{_PARAMETER})?)*)?{_OWS}"
)


def preferences(header: str) -> dict[str, str | None] | None:
    """Each preference's name (lower case) and value (unquoted; None when it has none), the first
    instance of each name; None when the header does not parse."""
    found: dict[str, str | None] = {}
    position = 0
    while True:
        match = _ELEMENT.match(header, position)
        assert match is not None  # the element may be empty, so it always matches
        if match.group(1):
            value = match.group(2)
            if value is not None and value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            found.setdefault(match.group(1).lower(), value)
        end = match.end()
        if end == len(header):
            return found
        if header[end] != ",":
            return None
        position = end + 1


def applied_wait(header: str | None, *, cap: float) -> int | None:
    """The seconds a submit with this Prefer header waits (whole seconds, at most `cap`), or None
    when it asks for no wait that can be applied."""
    if not header:
        return None
    found = preferences(header)
    if found is None or "wait" not in found:
        return None
    value = found["wait"]
    limit = max(0, math.floor(cap))
    if value is None:
        return limit
    if not (value.isascii() and value.isdigit()):
        return None
    return min(int(value), limit)
