"""What a chat request asks of the engine beyond text: checked against what the engine can do,
rendered with its tools, constrained by a grammar where it must be, and the model's output
shaped back into OpenAI messages and deltas with their tool calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmhost.api.protocol import ChatCompletionRequest
from llmhost.api.protocol_chat import (
    NamedToolChoice,
    check_conversation,
    check_tool_choice,
    check_tools,
    schema_error,
)
from llmhost.chatml import FALLBACK_TEMPLATE
from llmhost.engines import toolcalls
from llmhost.engines.base import Engine
from llmhost.engines.chat_template import render_chat
from llmhost.errors import InvalidRequest
from llmhost.types import Constraint, TokenDelta


def _refuse(engine: Engine, param: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"{what} is not supported by this model's engine ({engine.name})", param=param
    )


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request runs: the prompt, the constraint on its output, the fields an
    upstream gets, and how its output is read back."""

    prompt: str
    messages: tuple[dict[str, Any], ...]
    constraint: Constraint | None
    forward: dict[str, Any] | None
    parser_name: str | None  # None: the output is plain text
    forced: str | None  # "required", or the name of the one function to call
    tool_names: frozenset[str]

    def parser(self) -> toolcalls.ToolCallParser | None:
        if self.forced == "required":
            return toolcalls.RequiredCallsParser()
        if self.forced is not None:
            return toolcalls.NamedCallParser(self.forced)
        if self.parser_name is None:
            return None
        return toolcalls.make_parser(self.parser_name, sorted(self.tool_names))


def _schema_errors(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """The first tool or response schema that is not valid JSON Schema, as (param, why)."""
    for tool in req.tools or ():
        params = tool.function.parameters
        why = params is not None and schema_error(params, f"{tool.function.name}.parameters")
        if why:
            return "tools", why
    fmt = req.response_format
    if fmt is not None and fmt.json_schema is not None:
        why = schema_error(fmt.json_schema.schema_, "response_format.json_schema.schema")
        if why:
            return "response_format", why
    return None


async def check_schemas(req: ChatCompletionRequest) -> None:
    """Every schema the request carries is valid JSON Schema (checked in a worker thread: up
    to half a megabyte of schemas must not hold up the event loop)."""
    if not req.tools and (req.response_format is None or req.response_format.json_schema is None):
        return
    found = await asyncio.to_thread(_schema_errors, req)
    if found is not None:
        raise InvalidRequest(found[1], param=found[0])


def _tool_mode(req: ChatCompletionRequest) -> tuple[bool, str | None]:
    """Whether the model is offered tools, and the call it is forced to make: "required",
    the name of one function, or None."""
    uses_tools = bool(req.tools) and req.tool_choice != "none"
    if uses_tools and req.tool_choice == "required":
        return True, "required"
    if uses_tools and isinstance(req.tool_choice, NamedToolChoice):
        return True, req.tool_choice.function.name
    return uses_tools, None


def _valid(check: Callable[[], None], param: str) -> None:
    try:
        check()
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def _check(
    req: ChatCompletionRequest, engine: Engine, uses_tools: bool, forced: str | None
) -> None:
    _valid(lambda: check_tools(req.tools), "tools")
    _valid(lambda: check_tool_choice(req.tools, req.tool_choice), "tool_choice")
    _valid(lambda: check_conversation(req.messages), "messages")
    fmt = req.response_format
    wants_schema = fmt is not None and fmt.type != "text"
    if uses_tools and not engine.supports_tools:
        raise _refuse(engine, "tools", "tool calling")
    if wants_schema and not engine.supports_schema:
        raise _refuse(engine, "response_format", f"response_format {fmt.type!r}")  # type: ignore[union-attr]
    if forced and not engine.supports_schema and not engine.remote:
        raise _refuse(engine, "tool_choice", "a forced tool_choice (constrained decoding)")
    if req.stop and (wants_schema or forced) and not engine.remote:
        raise InvalidRequest(
            "stop cannot be combined with a response_format schema or a forced tool_choice: "
            "a stop string would cut the structured output short",
            param="stop",
        )


def _constraint(
    req: ChatCompletionRequest, tools: list[dict[str, Any]] | None, forced: str | None
) -> Constraint | None:
    if forced == "required":
        return toolcalls.required_constraint(tools or [], req.parallel_tool_calls)
    if forced is not None:
        tool = next(t for t in tools or () if t["function"]["name"] == forced)
        return toolcalls.named_constraint(tool)
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    assert fmt.json_schema is not None  # checked by ResponseFormat
    return Constraint(
        "json_schema",
        json.dumps(fmt.json_schema.schema_, ensure_ascii=False, separators=(",", ":")),
    )


def _forward(req: ChatCompletionRequest) -> dict[str, Any]:
    fields = ("tools", "tool_choice", "response_format", "documents", "chat_template_kwargs")
    out = req.model_dump(include=set(fields), exclude_none=True, by_alias=True)
    if req.tools:
        out["parallel_tool_calls"] = req.parallel_tool_calls
    return out


def plan_chat(req: ChatCompletionRequest, engine: Engine, tool_parser: str | None) -> ChatPlan:
    """Check `req` against `engine` (400s name the field) and decide how it runs."""
    uses_tools, forced = _tool_mode(req)
    _check(req, engine, uses_tools, forced)
    messages = tuple(m.for_template() for m in req.messages)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()] if uses_tools else None
    # OpenAI's "developer" turn is the system turn to every template (llama-server does this).
    prompt = render_chat(
        [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages],
        engine.chat_template,
        bos_token=engine.bos_token,
        eos_token=engine.eos_token,
        tools=tools,
        documents=req.documents,
        extra_context=req.chat_template_kwargs,
    )
    if engine.remote:
        return ChatPlan(prompt, messages, None, _forward(req), None, None, frozenset())
    parser_name = None
    if uses_tools:
        template = engine.chat_template or FALLBACK_TEMPLATE
        parser_name = tool_parser or engine.tool_parser or toolcalls.detect(template)
    return ChatPlan(
        prompt=prompt,
        messages=messages,
        constraint=_constraint(req, tools, forced),
        forward=None,
        parser_name=parser_name,
        forced=forced,
        tool_names=frozenset(t["function"]["name"] for t in tools or ()),
    )


# --- output ------------------------------------------------------------------------------------


def _call_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"index": index, **fields}


class ChatShaper:
    """Turns engine deltas into chat chunks' `delta` objects and the whole message, with tool
    calls parsed from the text (in-process engines) or passed on as the upstream sent them."""

    def __init__(self, parser: toolcalls.ToolCallParser | None, *, forced: bool = False):
        self.parser = parser
        self.called = False
        # A forced call's output is JSON by construction: what does not become a call (a
        # call cut short before its name) is never shown as text.
        self.forced = forced

    def _events(self, text: str, final: bool) -> list[toolcalls.Event]:
        assert self.parser is not None
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        if self.forced:
            events = [e for e in events if not isinstance(e, toolcalls.Content)]
        return events

    def deltas(self, d: TokenDelta) -> list[dict[str, Any]]:
        """The `delta` objects one engine delta makes (often one, sometimes none)."""
        out: list[dict[str, Any]] = []
        if d.tool_calls:
            self.called = True
            out.append({"tool_calls": list(d.tool_calls)})
        if self.parser is None:
            events: list[toolcalls.Event] = [toolcalls.Content(d.text)] if d.text else []
        else:
            events = self._events(d.text, d.finish_reason is not None)
        for ev in events:
            out.append(self._delta(ev))
        return _merge(out)

    def _delta(self, ev: toolcalls.Event) -> dict[str, Any]:
        if isinstance(ev, toolcalls.Content):
            return {"content": ev.text}
        self.called = True
        if isinstance(ev, toolcalls.CallStart):
            fn = {"name": ev.name, "arguments": ""}
            return {"tool_calls": [_call_delta(ev.index, id=ev.id, type="function", function=fn)]}
        return {"tool_calls": [_call_delta(ev.index, function={"arguments": ev.fragment})]}

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason

    def message(self, text: str, remote_calls: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole assistant message for a response that was not streamed: read from the
        same events a stream sends, so both ways give the same calls and text."""
        if remote_calls:
            self.called = True
            return {"role": "assistant", "content": text or None, "tool_calls": remote_calls}
        if self.parser is None:
            return {"role": "assistant", "content": text}
        events = self._events(text, True)
        content = "".join(e.text for e in events if isinstance(e, toolcalls.Content))
        calls: dict[int, dict[str, Any]] = {}
        for ev in events:
            if isinstance(ev, toolcalls.CallStart):
                fn = {"name": ev.name, "arguments": ""}
                calls[ev.index] = {"id": ev.id, "type": "function", "function": fn}
            elif isinstance(ev, toolcalls.CallArgs):
                calls[ev.index]["function"]["arguments"] += ev.fragment
        if not calls:
            return {"role": "assistant", "content": None if self.forced else content}
        self.called = True
        return {
            "role": "assistant",
            "content": content if content.strip() else None,
            "tool_calls": [calls[i] for i in sorted(calls)],
        }


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neighbouring pieces of the same kind in one delta: text joined, a call's start and its
    argument fragments joined into one entry."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and "content" in d and "content" in prev:
            prev["content"] += d["content"]
        elif prev is not None and "tool_calls" in d and "tool_calls" in prev:
            last = prev["tool_calls"][-1]
            for call in d["tool_calls"]:
                if call["index"] == last["index"] and set(call) == {"index", "function"}:
                    last.setdefault("function", {}).setdefault("arguments", "")
                    last["function"]["arguments"] += call["function"].get("arguments", "")
                else:
                    prev["tool_calls"].append(call)
                    last = call
        else:
            out.append(d)
    return out


def gather_remote_calls(
    acc: dict[int, dict[str, Any]], fragments: tuple[dict[str, Any], ...]
) -> None:
    """Fold streamed tool-call fragments from an upstream into whole calls, by index."""
    for frag in fragments:
        call = acc.setdefault(
            int(frag.get("index", len(acc))),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if frag.get("id"):
            call["id"] = frag["id"]
        fn = frag.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
