"""The events a tool-call parser emits, and the text and JSON helpers the parsers share."""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Event semantics (what `feed` and `finish` return, in order):
# - `Content(text)`: text outside tool-call markup. Text that may still turn out to be markup (a
#   partial marker, a JSON object at the start of a start-anchored format) is held back until
#   decided; whitespace just before a call is dropped, and trailing whitespace is kept only when
#   no call was made.
# - `CallStart(index, id, name)`: a call whose name is known (and, in free-form output, whose
#   arguments have begun); indexes count from 0 in output order.
# - `CallArgs(index, fragment)`: the next piece of that call's arguments; a call's fragments
#   joined are its final `arguments`, the JSON text of an object.
# Malformed markup (no name, invalid JSON, never closed) seen before `CallStart` comes back as
# `Content`, raw; after `CallStart` it cannot be taken back, so the call is left as sent. Either
# way the parser's `malformed` is set and `parse` returns the whole text as content, no calls.
# Calls to functions not among the request's tools are returned as they are (OpenAI may do the
# same); the caller compares names with its tools if it cares.


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArgs:
    index: int
    fragment: str


Event = Content | CallStart | CallArgs
State = Callable[[str, int], int]

_ALNUM = string.ascii_letters + string.digits
_WS = " \t\r\n"
_WAIT = -1  # a state returns this when it cannot decide before more text arrives
_MAX_NAME = 256
# Each pattern is one character class, so a search never backtracks.
_NON_WS = re.compile(r"[^ \t\r\n]")
_STR_STOP = re.compile(r'["\\]')
_STRUCT = re.compile(r'["{}\[\]]')
_SCALAR_END = re.compile(r"[ \t\r\n,}\]]")
_BRACKET = re.compile(r"\[")
_NEWLINE = re.compile(r"\n")
_HEAD_STOP = re.compile(r"[<\n]")
_NAME_CHARS = frozenset(_ALNUM + "_-.:")


def _random_id(length: int, prefix: str = "") -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


def _openai_id() -> str:
    return _random_id(24, "call_")


def _skip_ws(s: str, i: int) -> int:
    m = _NON_WS.search(s, i)
    return m.start() if m else len(s)


def _is_partial(s: str, i: int, literal: str) -> bool:
    """Whether s[i:] is a proper prefix of `literal` (the rest of it may still arrive)."""
    return len(s) - i < len(literal) and literal.startswith(s[i:])


def _held_tail(s: str, i: int, marker: str) -> int:
    """Length of the longest tail of s[i:] that is a proper prefix of `marker`."""
    k = s.find(marker[0], max(i, len(s) - len(marker) + 1))
    while k >= 0:
        if marker.startswith(s[k:]):
            return len(s) - k
        k = s.find(marker[0], k + 1)
    return 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, parse_constant=_reject_constant), dict)
    except ValueError:
        return False


def _decode_string(raw: str) -> str | None:
    """The value of a JSON string given the text between its quotes, or None if invalid."""
    try:
        value: str = json.loads('"' + raw + '"')
        return value
    except ValueError:
        return None


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and not any(c in _WS for c in name)
