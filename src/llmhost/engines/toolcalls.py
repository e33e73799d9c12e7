"""Tool calls in generated text: incremental parsers per model family that turn the text into
content and tool-call events, and the JSON-schema constraints that force a call.

Event semantics (what `feed` and `finish` return, in order):
- `Content(text)`: text outside tool-call markup. Text that may still turn out to be markup (a
  partial marker, a JSON object at the start of a start-anchored format) is held back until
  decided; whitespace just before a call is dropped, and trailing whitespace is kept only when
  no call was made.
- `CallStart(index, id, name)`: a call whose name is known (and, in free-form output, whose
  arguments have begun); indexes count from 0 in output order.
- `CallArgs(index, fragment)`: the next piece of that call's arguments; a call's fragments
  joined are its final `arguments`, the JSON text of an object.
Malformed markup (no name, invalid JSON, never closed) seen before `CallStart` comes back as
`Content`, raw; after `CallStart` it cannot be taken back, so the call is left as sent. Either
way the parser's `malformed` is set and `parse` returns the whole text as content, no calls.
Calls to functions not among the request's tools are returned as they are (OpenAI may do the
same); the caller compares names with its tools if it cares.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from llmhost.types import Constraint

__all__ = [
    "PARSERS",
    "CallArgs",
    "CallStart",
    "Content",
    "Event",
    "NamedCallParser",
    "RequiredCallsParser",
    "ToolCall",
    "ToolCallParser",
    "detect",
    "make_parser",
    "named_constraint",
    "parse",
    "required_constraint",
]


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
        return json.loads('"' + raw + '"')
    except ValueError:
        return None


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and not any(c in _WS for c in name)


class ToolCallParser:
    """Incremental parser of one generation's text: `feed` pieces as they arrive, then call
    `finish` once. Subclasses pick the initial state and the text state (where plain content
    is scanned); the machinery below scans JSON with a small state machine (string, escape,
    depth) so the cost stays linear in the text however it is split."""

    marker: str = ""  # the text that opens tool-call markup in content, if any

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.tools = tuple(tools or ())
        self.calls: list[ToolCall] = []  # completed calls with valid arguments
        self.malformed = False
        self._out: list[Event] = []
        self._carry = ""  # undecided tail of the last feed, scanned again with the next
        self._pending_ws: list[str] = []
        # Raw markup not yet committed by a CallStart; given back as content if it fails.
        self._region: list[str] | None = None
        self._region_from = 0
        self._tolerant = False  # the region is only what follows a finished call
        self._index = -1
        self._open = False  # CallStart sent, call not finished
        self._state: State = self._st_text
        # The call being read.
        self._name: str | None = None
        self._kind: Literal["object", "string"] | None = None
        self._args: list[str] = []
        self._call_id = ""
        self._key: list[str] = []
        self._key_name = ""
        self._first_key = True
        self._after_call: Callable[[], None] = self._to_text
        # String and value scanning.
        self._esc = False
        self._depth = 0
        self._in_str = False
        self._scalar = False
        self._v_begun = False
        self._v_sink: Callable[[str], None] | None = None
        self._v_end: Callable[[str, int], int] = self._after_field
        self._array_done: Callable[[], None] = self._to_text
        self._fenced = False

    # -- public interface ------------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        s = self._carry + text
        self._carry = ""
        if self._region is not None:
            self._region_from = 0
        i, n = 0, len(s)
        while i < n:
            j = self._state(s, i)
            if j == _WAIT:
                self._carry = s[i:]
                break
            i = j
        if self._region is not None:
            self._region.append(s[self._region_from : n - len(self._carry)])
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Event]:
        rest, self._carry = self._carry, ""
        if self._region is not None:
            if not self._tolerant:
                self.malformed = True
                self._content("".join(self._region) + rest)
            self._region = None
        elif self._open:
            self.malformed = True
        else:
            self._content(rest)
        self._open = False
        if self._index < 0 and self._pending_ws:
            self._out.append(Content("".join(self._pending_ws)))
        self._pending_ws = []
        out, self._out = self._out, []
        return out

    # -- output ----------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        # Trailing whitespace waits: it is dropped if a call follows.
        if not text:
            return
        body = text.rstrip(_WS)
        if not body:
            self._pending_ws.append(text)
            return
        tail = text[len(body) :]
        self._out.append(Content("".join(self._pending_ws) + body))
        self._pending_ws = [tail] if tail else []

    def _new_id(self) -> str:
        return _openai_id()

    def _commit(self) -> None:
        self._index += 1
        self._open = True
        self._region = None
        self._pending_ws = []
        self._call_id = self._new_id()
        self._out.append(CallStart(self._index, self._call_id, self._name or ""))
        if self._kind == "object" and self._args:
            self._out.append(CallArgs(self._index, "".join(self._args)))

    def _args_sink(self, fragment: str) -> None:
        if not fragment:
            return
        self._args.append(fragment)
        if self._open and self._kind == "object":
            self._out.append(CallArgs(self._index, fragment))

    def _finish_call(self, s: str, j: int) -> int:
        """Validate the call read so far; on success record it and start the region after it."""
        if self._name is None or self._kind is None:
            return self._fail(s, j)
        text = "".join(self._args)
        if self._kind == "string":
            try:
                inner = json.loads(text)
            except ValueError:
                inner = None
            if not isinstance(inner, str) or not _json_object(inner):
                return self._fail(s, j)
            text = inner
        elif not _json_object(text):
            return self._fail(s, j)
        if not self._open:
            self._commit()
        if self._kind == "string":
            self._out.append(CallArgs(self._index, text))
        self.calls.append(ToolCall(self._call_id, self._name, text))
        self._open = False
        self._begin_region(j, tolerant=True)
        self._after_call()
        return j

    def _fail(self, s: str, k: int) -> int:
        """Markup turned out malformed at s[k]: give back uncommitted raw text as content and
        go on scanning content from s[k]."""
        self.malformed = True
        if self._region is not None:
            raw = "".join(self._region) + s[self._region_from : k]
            self._region = None
            self._content(raw)
        self._open = False
        self._to_text()
        return k

    # -- regions and content states ------------------------------------------------------

    def _begin_region(self, k: int, tolerant: bool = False) -> None:
        self._region = []
        self._region_from = k
        self._tolerant = tolerant

    def _to_text(self) -> None:
        self._region = None
        self._state = self._st_text

    def _st_text(self, s: str, i: int) -> int:
        """Plain content, watching for the family's marker."""
        m = self.marker
        if not m:
            self._content(s[i:])
            return len(s)
        k = s.find(m, i)
        if k >= 0:
            self._content(s[i:k])
            self._begin_region(k)
            self._after_marker()
            return k + len(m)
        end = len(s) - _held_tail(s, i, m)
        self._content(s[i:end])
        return end if end > i else _WAIT

    def _after_marker(self) -> None:
        raise NotImplementedError

    def _expect(self, options: Sequence[tuple[str, Callable[[], None]]]) -> State:
        """A state that skips whitespace and then takes one of the literals."""

        def state(s: str, i: int) -> int:
            j = _skip_ws(s, i)
            if j == len(s):
                return j
            for literal, action in options:
                if s.startswith(literal, j):
                    action()
                    return j + len(literal)
            if any(_is_partial(s, j, literal) for literal, _ in options):
                return _WAIT if j == i else j
            return self._fail(s, j)

        return state

    # -- JSON values ---------------------------------------------------------------------

    def _new_call(self) -> None:
        self._tolerant = False
        self._name = None
        self._kind = None
        self._args = []

    def _begin_value(
        self, sink: Callable[[str], None] | None, end: Callable[[str, int], int]
    ) -> None:
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._scalar = False
        self._v_begun = False
        self._v_sink = sink
        self._v_end = end
        self._state = self._st_value

    def _st_value(self, s: str, i: int) -> int:
        """Any JSON value, scanned for its end; its raw text goes to the sink."""
        j, n = i, len(s)
        if not self._v_begun:
            self._v_begun = True
            c = s[i]
            if c in "{[":
                self._depth = 1
                j = i + 1
            elif c == '"':
                self._in_str = True
                j = i + 1
            elif c in "-0123456789tfn":
                self._scalar = True
            else:
                return self._fail(s, i)
        done = False
        while j < n:
            if self._scalar:
                m = _SCALAR_END.search(s, j)
                if m is None:
                    j = n
                    break
                j = m.start()
                done = True
                break
            if self._in_str:
                if self._esc:
                    self._esc = False
                    j += 1
                    continue
                m = _STR_STOP.search(s, j)
                if m is None:
                    j = n
                    break
                k = m.start()
                j = k + 1
                if s[k] == "\\":
                    self._esc = True
                    continue
                self._in_str = False
                if self._depth == 0:
                    done = True
                    break
                continue
            m = _STRUCT.search(s, j)
            if m is None:
                j = n
                break
            k = m.start()
            j = k + 1
            c = s[k]
            if c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        if self._v_sink is not None and j > i:
            self._v_sink(s[i:j])
        if done:
            return self._v_end(s, j)
        return j

    def _scan_string(self, s: str, i: int, buf: list[str]) -> tuple[int, bool]:
        """Raw text of a JSON string up to its closing quote; (next index, closed)."""
        j, n = i, len(s)
        while j < n:
            if self._esc:
                self._esc = False
                j += 1
                continue
            m = _STR_STOP.search(s, j)
            if m is None:
                break
            k = m.start()
            if s[k] == "\\":
                self._esc = True
                j = k + 1
                continue
            buf.append(s[i:k])
            return k + 1, True
        buf.append(s[i:n])
        return n, False

    def _take_until(self, s: str, i: int, stops: re.Pattern[str]) -> int:
        """Collect text into the key buffer up to a character matching `stops` (not taken);
        fails past _MAX_NAME characters, at the same place however the text was split.
        Returns the next index, or -2 - the index of the stop character once found."""
        room = _MAX_NAME + 1 - sum(map(len, self._key))
        limit = min(len(s), i + room)
        m = stops.search(s, i, limit)
        k = m.start() if m else -1
        end = limit if k < 0 else k
        self._key.append(s[i:end])
        if k >= 0:
            return -2 - k
        if end - i == room:
            return self._fail(s, end)
        return end

    def _st_fence_tag(self, s: str, i: int) -> int:
        # The language tag after an opening fence ("json" or nothing) up to the end of line.
        k = s.find("\n", i, i + 17)
        if k < 0:
            return _WAIT if len(s) - i <= 16 else self._fail(s, i)
        if s[i:k].strip() not in ("", "json"):
            return self._fail(s, i)
        self._state = self._st_fenced_body
        return k + 1

    def _st_fenced_body(self, s: str, i: int) -> int:
        raise NotImplementedError

    def _begin_args(self, s: str, j: int, end: Callable[[str, int], int]) -> int:
        """Arguments start at s[j]: an object, streamed, or a string holding one, kept whole."""
        c = s[j]
        if c == "{":
            self._kind = "object"
        elif c == '"' and self._kind_string_ok:
            self._kind = "string"
        else:
            return self._fail(s, j)
        if self._name is not None and not self._open:
            self._commit()
        self._begin_value(self._args_sink, end)
        return j

    _kind_string_ok = True
    # Free-form output commits a call once it has both a name and arguments, so an object with
    # a name but no arguments stays content; constrained output may commit on the name alone.
    _start_on_name = False

    # -- call objects {"name": ..., "arguments": ...} ------------------------------------

    def _begin_object(self) -> None:
        """Called with the object's "{" consumed."""
        self._new_call()
        self._first_key = True
        self._state = self._st_key_or_end

    def _st_key_or_end(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        c = s[j]
        if c == '"':
            self._key = []
            self._esc = False
            self._state = self._st_key
            return j + 1
        if c == "}" and self._first_key:
            return self._end_object(s, j + 1)
        return self._fail(s, j)

    def _st_key(self, s: str, i: int) -> int:
        j, closed = self._scan_string(s, i, self._key)
        if closed:
            key = _decode_string("".join(self._key))
            if key is None:
                return self._fail(s, j)
            self._key_name = key
            self._state = self._st_colon
        return j

    def _st_colon(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] != ":":
            return self._fail(s, j)
        self._state = self._st_field
        return j + 1

    def _st_field(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        return _FIELDS.get(self._key_name, ToolCallParser._field_skip)(self, s, j)

    def _field_name(self, s: str, j: int) -> int:
        if self._name is not None:
            return self._field_skip(s, j)
        if s[j] != '"':
            return self._fail(s, j)
        self._key = []
        self._esc = False
        self._state = self._st_name
        return j + 1

    def _st_name(self, s: str, i: int) -> int:
        j, closed = self._scan_string(s, i, self._key)
        if closed:
            name = _decode_string("".join(self._key))
            if name is None or not name.strip():
                return self._fail(s, j)
            self._name = name
            if self._kind is not None or self._start_on_name:
                self._commit()
            self._state = self._st_after_field
        return j

    def _field_args(self, s: str, j: int) -> int:
        if self._kind is not None:
            return self._field_skip(s, j)
        return self._begin_args(s, j, self._after_field)

    def _field_skip(self, s: str, j: int) -> int:
        self._begin_value(None, self._after_field)
        return j

    def _after_field(self, s: str, j: int) -> int:
        self._state = self._st_after_field
        return j

    def _st_after_field(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        c = s[j]
        if c == ",":
            self._first_key = False
            self._state = self._st_key_or_end
            return j + 1
        if c == "}":
            return self._end_object(s, j + 1)
        return self._fail(s, j)

    def _end_object(self, s: str, j: int) -> int:
        return self._finish_call(s, j)

    # -- arrays of call objects ------------------------------------------------------------

    def _begin_array(self, after: Callable[[], None]) -> None:
        """Called with the array's "[" consumed; `after` runs once its "]" is taken."""
        self._array_done = after
        self._state = self._st_array_item

    def _st_array_item(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] != "{":
            return self._fail(s, j)
        self._after_call = self._to_array_sep
        self._begin_object()
        return j + 1

    def _to_array_sep(self) -> None:
        self._state = self._st_array_sep

    def _st_array_sep(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        c = s[j]
        if c == ",":
            self._state = self._st_array_item
            return j + 1
        if c == "]":
            self._array_done()
            return j + 1
        return self._fail(s, j)


_FIELDS: Mapping[str, Callable[[ToolCallParser, str, int], int]] = MappingProxyType(
    {
        "name": ToolCallParser._field_name,
        "arguments": ToolCallParser._field_args,
        "parameters": ToolCallParser._field_args,
    }
)


class HermesParser(ToolCallParser):
    """Hermes 2/3, Qwen 2.5/3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    several in a row. A missing closing tag at the very end is forgiven (as vLLM does)."""

    marker = "<tool_call>"

    def _after_marker(self) -> None:
        self._state = self._st_open

    def _st_open(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] != "{":
            return self._fail(s, j)
        self._after_call = self._to_close
        self._begin_object()
        return j + 1

    def _to_close(self) -> None:
        self._state = self._expect((("</tool_call>", self._to_text),))


class _StartAnchored(ToolCallParser):
    """Formats where a call is the whole output: only text starting (after whitespace) with a
    call is parsed; anything else is content, passed through at once."""

    fence: bool = False

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = self._st_start

    def _st_start(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j > i:
            self._content(s[i:j])
        if j == len(s):
            return j
        for opener, action in self._openers():
            if s.startswith(opener, j):
                self._begin_region(j)
                action()
                return j + len(opener)
        if any(_is_partial(s, j, opener) for opener, _ in self._openers()):
            return _WAIT if j == i else j
        self._to_text()
        return j

    def _openers(self) -> tuple[tuple[str, Callable[[], None]], ...]:
        raise NotImplementedError


class Llama3Parser(_StartAnchored):
    """Llama 3.1/3.2/3.3 JSON calls: `{"name": ..., "parameters": {...}}`, optionally after
    `<|python_tag|>`, several separated by ";"."""

    tag = "<|python_tag|>"

    def _openers(self) -> tuple[tuple[str, Callable[[], None]], ...]:
        return (("{", self._object), (self.tag, self._after_tag))

    def _object(self) -> None:
        self._after_call = self._to_sep
        self._begin_object()

    def _after_tag(self) -> None:
        self._state = self._st_after_tag

    def _st_after_tag(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] != "{":
            return self._fail(s, j)
        self._object()
        return j + 1

    def _to_sep(self) -> None:
        self._seen_sep = False
        self._state = self._st_sep

    def _st_sep(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        c = s[j]
        if c == ";" and not self._seen_sep:
            self._seen_sep = True
            return j + 1
        if c == "{":
            self._object()
            return j + 1
        if s.startswith(self.tag, j):
            self._state = self._st_after_tag
            return j + len(self.tag)
        if _is_partial(s, j, self.tag):
            return _WAIT if j == i else j
        # Text after the calls is content.
        self._to_text()
        return j


class JsonParser(_StartAnchored):
    """Generic fallback: the output is `{"name": ..., "arguments": {...}}` or an array of
    them, optionally inside a ```json fence."""

    def _openers(self) -> tuple[tuple[str, Callable[[], None]], ...]:
        return (("{", self._object), ("[", self._array), ("```", self._fence_open))

    def _object(self) -> None:
        self._after_call = self._to_tail
        self._begin_object()

    def _array(self) -> None:
        self._begin_array(self._to_tail)

    def _fence_open(self) -> None:
        self._fenced = True
        self._state = self._st_fence_tag

    def _st_fenced_body(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        c = s[j]
        if c == "{":
            self._object()
        elif c == "[":
            self._array()
        else:
            return self._fail(s, j)
        return j + 1

    def _to_tail(self) -> None:
        if self._fenced:
            self._state = self._expect((("```", self._to_text),))
        else:
            self._to_text()


class MistralParser(ToolCallParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and from tokenizer v11
    on `[TOOL_CALLS]name[ARGS]{...}` (optionally `name[CALL_ID]id[ARGS]`), one marker per call.
    Ids are 9 alphanumerics: Mistral chat templates refuse any other tool-call id."""

    marker = "[TOOL_CALLS]"
    _kind_string_ok = False

    def _new_id(self) -> str:
        return _random_id(9)

    def _after_marker(self) -> None:
        self._state = self._st_open

    def _st_open(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] == "[":
            self._kind_string_ok = True
            self._begin_array(self._to_text)
            return j + 1
        self._kind_string_ok = False
        self._new_call()
        self._key = []
        self._state = self._st_name_v11
        return j

    def _st_name_v11(self, s: str, i: int) -> int:
        j = self._take_until(s, i, _BRACKET)
        if j >= -1:
            return j
        j = -2 - j
        name = "".join(self._key)
        if not name or not all(c in _NAME_CHARS for c in name):
            return self._fail(s, j)
        self._name = name
        self._state = self._expect((("[ARGS]", self._to_args), ("[CALL_ID]", self._to_call_id)))
        return j

    def _to_call_id(self) -> None:
        self._state = self._st_call_id

    def _st_call_id(self, s: str, i: int) -> int:
        k = s.find("[", i)
        if k < 0:
            return len(s)
        self._state = self._expect((("[ARGS]", self._to_args),))
        return k

    def _to_args(self) -> None:
        self._state = self._st_args

    def _st_args(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        self._after_call = self._to_text
        return self._begin_args(s, j, self._finish_call)


class DeepSeekParser(ToolCallParser):
    """DeepSeek V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json {...} ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; V3.1 puts
    `NAME<｜tool▁sep｜>{...}` between the call tokens instead."""

    marker = "<｜tool▁calls▁begin｜>"
    call_begin = "<｜tool▁call▁begin｜>"
    call_end = "<｜tool▁call▁end｜>"
    sep = "<｜tool▁sep｜>"
    calls_end = "<｜tool▁calls▁end｜>"
    _kind_string_ok = False

    def _after_marker(self) -> None:
        self._state = self._expect(((self.call_begin, self._begin_call),))

    def _begin_call(self) -> None:
        self._new_call()
        self._key = []
        self._state = self._st_head

    def _st_head(self, s: str, i: int) -> int:
        """The text before the separator: the type ("function") in V3, the name in V3.1."""
        k = self._take_until(s, i, _HEAD_STOP)
        if k >= -1:
            return k
        k = -2 - k
        if s[k] == "\n":
            return self._fail(s, k)
        self._state = self._expect(((self.sep, self._after_sep),))
        return k

    def _after_sep(self) -> None:
        self._state = self._st_after_sep

    def _st_after_sep(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] == "{":
            name = "".join(self._key).strip()
            if not _valid_name(name):
                return self._fail(s, j)
            self._name = name
            self._fenced = False
            self._after_call = self._to_call_end
            return self._begin_args(s, j, self._finish_call)
        self._key = []
        self._state = self._st_name_v3
        return j

    def _st_name_v3(self, s: str, i: int) -> int:
        k = self._take_until(s, i, _NEWLINE)
        if k >= -1:
            return k
        k = -2 - k
        name = "".join(self._key).strip()
        if not _valid_name(name):
            return self._fail(s, k)
        self._name = name
        self._state = self._st_fence
        return k + 1

    def _st_fence(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] == "{":
            self._fenced = False
            self._after_call = self._to_call_end
            return self._begin_args(s, j, self._finish_call)
        if s.startswith("```", j):
            self._fenced = True
            self._state = self._st_fence_tag
            return j + 3
        if _is_partial(s, j, "```"):
            return _WAIT if j == i else j
        return self._fail(s, j)

    def _st_fenced_body(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        self._after_call = self._to_call_end
        return self._begin_args(s, j, self._finish_call)

    def _to_call_end(self) -> None:
        if self._fenced:
            self._state = self._expect((("```", self._to_call_end_token),))
        else:
            self._to_call_end_token()

    def _to_call_end_token(self) -> None:
        self._state = self._expect(((self.call_end, self._to_next),))

    def _to_next(self) -> None:
        self._state = self._expect(
            ((self.call_begin, self._begin_call), (self.calls_end, self._to_text))
        )


class NamedCallParser(ToolCallParser):
    """Output constrained to the named function's arguments object: CallStart at once, then
    the text as CallArgs."""

    def __init__(self, name: str, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._forced_name = name
        self._state = self._st_start

    def feed(self, text: str) -> list[Event]:
        if self._index < 0:
            self._name = self._forced_name
            self._commit()
            announced = self._out
            self._out = []
            return announced + super().feed(text)
        return super().feed(text)

    def finish(self) -> list[Event]:
        head = self.feed("") if self._index < 0 else []
        return head + super().finish()

    def _st_start(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        self._after_call = self._to_trailer
        self._kind_string_ok = False
        return self._begin_args(s, j, self._finish_call)

    def _to_trailer(self) -> None:
        self._region = None
        self._state = self._st_trailer

    def _st_trailer(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j < len(s):
            return self._fail(s, j)
        return j


class RequiredCallsParser(ToolCallParser):
    """Output constrained to `[{"name": ..., "arguments": {...}}, ...]` (see
    `required_constraint`): CallStart as soon as each name is complete."""

    _start_on_name = True

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = self._st_start

    def _st_start(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j == len(s):
            return j
        if s[j] != "[":
            return self._fail(s, j)
        self._begin_region(j)
        self._begin_array(self._to_trailer)
        return j + 1

    def _to_trailer(self) -> None:
        self._region = None
        self._state = self._st_trailer

    def _st_trailer(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j < len(s):
            return self._fail(s, j)
        return j


PARSERS: Mapping[str, type[ToolCallParser]] = MappingProxyType(
    {
        "hermes": HermesParser,
        "llama3": Llama3Parser,
        "mistral": MistralParser,
        "deepseek": DeepSeekParser,
        "json": JsonParser,
    }
)

# First match wins: Hermes-style templates for Llama models also mention ipython.
_TEMPLATE_MARKERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("tool▁calls▁begin", "deepseek"),
    ("<|python_tag|>", "llama3"),
    ("ipython", "llama3"),
)


def detect(template: str | None) -> str:
    """The tool-call family of a chat template, from the markers it mentions; "json" if none."""
    if template:
        for marker, family in _TEMPLATE_MARKERS:
            if marker in template:
                return family
    return "json"


def make_parser(name: str, tools: Sequence[Mapping[str, Any]] | None = None) -> ToolCallParser:
    try:
        cls = PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r} (known: {known})") from None
    return cls(tools)


def parse(parser: ToolCallParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """Content and calls of a whole output, as a non-streamed response gives them: content is
    None when there are calls and nothing else; malformed markup makes it all content."""
    events = parser.feed(text) + parser.finish()
    if parser.malformed:
        return text, []
    content: list[str] = []
    heads: list[CallStart] = []
    args: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, Content):
            content.append(event.text)
        elif isinstance(event, CallStart):
            heads.append(event)
            args[event.index] = []
        else:
            args[event.index].append(event.fragment)
    calls = [ToolCall(h.id, h.name, "".join(args[h.index])) for h in heads]
    joined = "".join(content)
    if calls and not joined.strip():
        return None, calls
    return joined, calls


# -- forced calls --------------------------------------------------------------------------

# A function declared without parameters takes none (OpenAI's reading), so its arguments are {}.
_EMPTY_OBJECT: Mapping[str, Any] = MappingProxyType(
    {"type": "object", "properties": {}, "additionalProperties": False}
)


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function part of an OpenAI tool entry (or the function itself)."""
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError("a tool needs a function with a name")
    return fn


def _parameters(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return dict(params) if isinstance(params, Mapping) and params else dict(_EMPTY_OBJECT)


def _dumps(schema: Any) -> str:
    # Same text for the same tools, so the compiled grammar's cache keyed on it hits.
    return json.dumps(schema, sort_keys=False, separators=(",", ":"), ensure_ascii=False)


def named_constraint(tool: Mapping[str, Any]) -> Constraint:
    """The output is the named function's arguments object, held to its parameters schema."""
    return Constraint("json_schema", _dumps(_parameters(_function(tool))))


def required_constraint(tools: Sequence[Mapping[str, Any]], parallel: bool) -> Constraint:
    """The output is a JSON array of calls `{"name": ..., "arguments": {...}}` to the given
    tools: one call, or one or more when `parallel`."""
    if not tools:
        raise ValueError("tool_choice required needs at least one tool")
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        fn = _function(tool)
        params = _parameters(fn)
        # References such as "#/$defs/X" resolve against the root, so definitions move there.
        for key in ("$defs", "definitions"):
            moved = params.pop(key, None)
            if not isinstance(moved, Mapping):
                continue
            for def_name, definition in moved.items():
                ref = f"{key}/{def_name}"
                if ref in defs and defs[ref] != definition:
                    raise ValueError(f"tools define {key} {def_name!r} differently")
                defs[ref] = definition
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": fn["name"]},
                    "arguments": params,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    schema["items"] = {"anyOf": variants}
    for ref, definition in defs.items():
        key, _, def_name = ref.partition("/")
        schema.setdefault(key, {})[def_name] = definition
    return Constraint("json_schema", _dumps(schema))
