"""Tool-call parsers per model family, the registry of them, and detection from a chat
template."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from llmhost.engines.toolcalls.events import (
    _BRACKET,
    _HEAD_STOP,
    _NAME_CHARS,
    _NEWLINE,
    _WAIT,
    CallStart,
    Content,
    ToolCall,
    _is_partial,
    _random_id,
    _skip_ws,
    _valid_name,
)
from llmhost.engines.toolcalls.scanner import ToolCallParser, Tools


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

    def __init__(self, tools: Tools | None = None) -> None:
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


def make_parser(name: str, tools: Tools | None = None) -> ToolCallParser:
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
