"""The base tool-call parser: incremental scanning of content, markers and JSON calls."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

from llmhost.engines.toolcalls.events import (
    _MAX_NAME,
    _SCALAR_END,
    _STR_STOP,
    _STRUCT,
    _WAIT,
    _WS,
    CallArgs,
    CallStart,
    Content,
    Event,
    State,
    ToolCall,
    _decode_string,
    _held_tail,
    _is_partial,
    _json_object,
    _openai_id,
    _skip_ws,
)

# The request's tools a parser is made for: their definitions, or only their names.
Tools = Sequence[Mapping[str, Any]] | Sequence[str]


class ToolCallParser:
    """Incremental parser of one generation's text: `feed` pieces as they arrive, then call
    `finish` once. Subclasses pick the initial state and the text state (where plain content
    is scanned); the machinery below scans JSON with a small state machine (string, escape,
    depth) so the cost stays linear in the text however it is split."""

    marker: str = ""  # the text that opens tool-call markup in content, if any

    def __init__(self, tools: Tools | None = None) -> None:
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

    # -- the end of a forced call's output: only whitespace may follow ------------------

    def _to_trailer(self) -> None:
        self._region = None
        self._state = self._st_trailer

    def _st_trailer(self, s: str, i: int) -> int:
        j = _skip_ws(s, i)
        if j < len(s):
            return self._fail(s, j)
        return j

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
