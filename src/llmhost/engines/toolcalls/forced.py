"""Forced tool calls (tool_choice naming a function, or "required"): their parsers and the
JSON-schema constraints that hold the output to them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from llmhost.engines.toolcalls.events import Event, _skip_ws
from llmhost.engines.toolcalls.scanner import ToolCallParser, Tools
from llmhost.types import Constraint


class NamedCallParser(ToolCallParser):
    """Output constrained to the named function's arguments object: CallStart at once, then
    the text as CallArgs."""

    def __init__(self, name: str, tools: Tools | None = None) -> None:
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


class RequiredCallsParser(ToolCallParser):
    """Output constrained to `[{"name": ..., "arguments": {...}}, ...]` (see
    `required_constraint`): CallStart as soon as each name is complete."""

    _start_on_name = True

    def __init__(self, tools: Tools | None = None) -> None:
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
