"""`POST /v1/responses`: a Responses request is read as the chat request it amounts to and run by
the chat machinery (templates, tool-call parsing, grammar constraints, metrics, request record); its
output is shaped as a Response object, or streamed as the Responses API's typed SSE events."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi.responses import StreamingResponse

from llmhost.api.protocol import ChatCompletionRequest
from llmhost.api.protocol_chat import (
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from llmhost.api.protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputText,
    OutputText,
    ResponsesRequest,
)
from llmhost.api.record import RequestRecord
from llmhost.api.serving import OpenAIServing
from llmhost.api.serving_chat import ChatShaper
from llmhost.api.sse import SSE_HEADERS, json_line
from llmhost.engines.base import TokenStream
from llmhost.errors import InvalidRequest, LlmhostError, ServiceUnavailable
from llmhost.types import TokenDelta, Usage

log = logging.getLogger("llmhost.api")

# The chat fields the chat machinery names in its errors, as the Responses API calls them.
_PARAMS = {
    "messages": "input",
    "prompt": "input",
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
}


def _renamed(exc: LlmhostError, forced: bool) -> LlmhostError:
    """`exc` naming the Responses field instead of the chat one (in `param` and where the
    message starts with or quotes it)."""
    old = exc.param
    if old is None:
        return exc
    # A forced call's grammar is built from the tools' schemas: name those (as chat does).
    new = "tools" if forced and old == "response_format" else _PARAMS.get(old, old)
    exc.param = new
    if old == "response_format":
        exc.message = exc.message.replace("response_format.json_schema", "text.format")
        exc.message = exc.message.replace("response_format", new)
    elif new != old and exc.message.startswith(old + " "):
        exc.message = new + exc.message[len(old) :]
    return exc


# --- the request as a chat request ---------------------------------------------------------


def _content(content: str | list[InputText | OutputText]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": p.text} for p in content]


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The conversation as chat messages: instructions first as the system message, a run of
    function_call items as one assistant message's tool calls (joined to the assistant message
    just before them), each function_call_output as a tool message."""
    out: list[ChatMessage] = []
    if req.instructions is not None:
        out.append(ChatMessage(role="system", content=req.instructions))
    called: set[str] = set()
    for i, item in enumerate(req.input):
        if isinstance(item, FunctionCallItem):
            call = ToolCall(
                id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments)
            )
            called.add(item.call_id)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or ()), call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise InvalidRequest(
                    f"input[{i}] is the output of call_id {item.call_id!r:.80}, which no "
                    "earlier function_call item made",
                    param="input",
                )
            out.append(
                ChatMessage(role="tool", tool_call_id=item.call_id, content=_content(item.output))
            )
        else:
            out.append(ChatMessage(role=item.role, content=_content(item.content)))
    return out


def _tool_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return NamedToolChoice(type="function", function=NamedFunction(name=choice.name))


def _response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None:
        return None
    schema = None
    if fmt.type == "json_schema":
        # Checked already (TextFormat): built without checking the schema's size again.
        schema = JsonSchemaFormat.model_construct(
            name=fmt.name,  # type: ignore[arg-type]
            description=fmt.description,
            schema_=fmt.schema_,  # type: ignore[arg-type]
            strict=fmt.strict,
        )
    return ResponseFormat.model_construct(type=fmt.type, json_schema=schema)


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request `req` amounts to. Every field was checked with the chat request's own
    bounds when `req` was parsed, so it is built without being checked again."""
    tools = [
        Tool.model_construct(
            type="function",
            function=FunctionDef.model_construct(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in req.tools or ()
    ]
    return ChatCompletionRequest.model_construct(
        model=req.model,
        messages=_messages(req),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stream=req.stream,
        max_completion_tokens=req.max_output_tokens,
        tools=tools or None,  # no tools: the same as none
        tool_choice=_tool_choice(req),
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=_response_format(req),
    )


# --- output --------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


Event = tuple[str, dict[str, Any]]


class _Output:
    """The output items of one response, built from the chat deltas ChatShaper makes; each
    step returns the stream events it makes. A whole answer goes through the same steps, so
    streamed and whole responses hold the same items. Whitespace outside any message (between
    calls, before the first) is shown only if it starts a message."""

    def __init__(self, forced: bool):
        self.forced = forced
        self.items: list[dict[str, Any]] = []
        self.text: list[str] = []  # the open message's text so far
        self.args: dict[int, list[str]] = {}  # by output index: a call's arguments so far
        self.calls: dict[int, int] = {}  # a chat tool-call index -> its output index
        self.open: int | None = None  # output index of the item being written
        self.pending = ""

    def feed(self, piece: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if "content" in piece:
            events += self._text(piece["content"])
        for frag in piece.get("tool_calls") or ():
            events += self._call(frag)
        return events

    def _text(self, text: str) -> list[Event]:
        if self.open is not None and self.items[self.open]["type"] == "message":
            self.text.append(text)
            return [self._text_delta(text)]
        if not text.strip():
            self.pending += text
            return []
        text, self.pending = self.pending + text, ""
        return self._message(text)

    def _message(self, text: str) -> list[Event]:
        """Open a message item holding `text` so far."""
        events = self._close("completed")
        index = len(self.items)
        item = {
            "type": "message",
            "id": _new_id("msg_"),
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.items.append(item)
        self.open, self.text = index, [text]
        head = {"item_id": item["id"], "output_index": index}
        events.append(("response.output_item.added", {"output_index": index, "item": dict(item)}))
        events.append(
            ("response.content_part.added", {**head, "content_index": 0, "part": _part("")})
        )
        if text:
            events.append(self._text_delta(text))
        return events

    def _text_delta(self, text: str) -> Event:
        item = self.items[self.open]  # type: ignore[index]
        fields = {"item_id": item["id"], "output_index": self.open, "content_index": 0}
        return "response.output_text.delta", {**fields, "delta": text, "logprobs": []}

    def _call(self, frag: dict[str, Any]) -> list[Event]:
        fn = frag.get("function") or {}
        key = int(frag.get("index", len(self.calls)))
        events: list[Event] = []
        index = self.calls.get(key)
        if index is None:
            self.pending = ""
            events += self._close("completed")
            index = len(self.items)
            item = {
                "type": "function_call",
                "id": _new_id("fc_"),
                "call_id": frag.get("id") or _new_id("call_"),
                "name": fn.get("name") or "",
                "arguments": "",
                "status": "in_progress",
            }
            self.items.append(item)
            self.calls[key], self.args[index], self.open = index, [], index
            events.append(("response.output_item.added", {"output_index": index, "item": item}))
        fragment = fn.get("arguments") or ""
        if fragment:
            self.args[index].append(fragment)
            item_id = self.items[index]["id"]
            events.append(
                (
                    "response.function_call_arguments.delta",
                    {"item_id": item_id, "output_index": index, "delta": fragment},
                )
            )
        return events

    def _settle(self, index: int, status: str) -> dict[str, Any]:
        """Item `index` as it stands, with `status`."""
        item = self.items[index]
        if item["type"] == "message":
            text = "".join(self.text) if index == self.open else item["content"][0]["text"]
            item = {**item, "content": [_part(text)]}
        else:
            item = {**item, "arguments": "".join(self.args[index])}
        return {**item, "status": status}

    def _close(self, status: str) -> list[Event]:
        index = self.open
        if index is None:
            return []
        item = self.items[index] = self._settle(index, status)
        self.open = None
        head = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            part = item["content"][0]
            return [
                (
                    "response.output_text.done",
                    {**head, "content_index": 0, "text": part["text"], "logprobs": []},
                ),
                ("response.content_part.done", {**head, "content_index": 0, "part": part}),
                ("response.output_item.done", {"output_index": index, "item": item}),
            ]
        return [
            ("response.function_call_arguments.done", {**head, "arguments": item["arguments"]}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]

    def finish(self, incomplete: bool) -> list[Event]:
        """Close the item being written (cut short when `incomplete`). An answer with no item
        at all is one empty message, unless a call was forced (then it is no item)."""
        events: list[Event] = []
        if not self.items and not self.forced:
            events += self._message(self.pending)
        self.pending = ""
        return events + self._close("incomplete" if incomplete else "completed")

    def snapshot(self) -> list[dict[str, Any]]:
        """The items so far, the open one as it stands (for a response that failed)."""
        return [
            self._settle(i, "incomplete") if i == self.open else item
            for i, item in enumerate(self.items)
        ]


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(u: Usage | None) -> dict[str, Any]:
    u = u or Usage(0, 0)
    return {
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        # the engines do not report their prefix cache's share per request
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request's settings, as a response repeats them."""
    fmt = req.text.format if req.text is not None else None
    choice: Any = req.tool_choice  # None, a string, or the named function as JSON
    if choice is not None and not isinstance(choice, str):
        choice = choice.model_dump()
    return {
        "instructions": req.instructions,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
        "tool_choice": "auto" if choice is None else choice,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "max_output_tokens": req.max_output_tokens,
        "text": {
            "format": {"type": "text"}
            if fmt is None
            else fmt.model_dump(exclude_none=True, by_alias=True)
        },
        "store": False,
        "metadata": req.metadata or {},
        "user": req.user,
        "previous_response_id": None,
        "reasoning": None,
        "truncation": "disabled",
        "background": False,
    }


class _Response:
    """The response object of one request, at each stage of its life."""

    def __init__(self, req: ResponsesRequest, request_id: str, model: str):
        self.head = {
            "id": f"resp_{request_id}",
            "object": "response",
            "created_at": int(time.time()),
        }
        self.model = model
        self.echo = _echo(req)

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        done = status in ("completed", "incomplete")
        return {
            **self.head,
            "completed_at": int(time.time()) if done else None,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "model": self.model,
            "output": output,
            "usage": _usage(usage) if done else None,
            **self.echo,
        }


class _Events:
    """The SSE bytes of one stream's events, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, fields: dict[str, Any]) -> bytes:
        data = json_line({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def create_response(
    s: OpenAIServing,
    req: ResponsesRequest,
    request_id: str,
    record: RequestRecord | None = None,
) -> dict[str, Any] | StreamingResponse:
    """Run `req` as the chat request it amounts to and answer as a Response object, or as SSE
    events when `req.stream`. Errors before the first token are real HTTP errors naming the
    Responses field; the request record is that of a chat request."""
    record = RequestRecord() if record is None else record
    model = s.check_model(req.model)
    forced = False
    try:
        chat = to_chat(req)
        plan, gen = await s.chat_request(chat, request_id)
        forced = plan.forced is not None
        record.model, record.prompt, record.stream = model, gen.prompt, req.stream
        first, stream = await s._start(gen, model)
    except LlmhostError as exc:
        raise _renamed(exc, forced) from None
    shaper = ChatShaper(plan.parser(), forced=forced)
    response = _Response(req, request_id, model)
    if not req.stream:
        done = await s._collect(first, stream, record)
        record.usage, record.chars = done.usage or Usage(0, 0), len(done.text)
        out = _Output(forced)
        for piece in shaper.deltas(replace(done, tool_calls=())):
            out.feed(piece)
        if done.tool_calls:  # an upstream's calls, whole
            out.feed({"tool_calls": [{"index": i, **c} for i, c in enumerate(done.tool_calls)]})
        incomplete = done.finish_reason == "length"
        out.finish(incomplete)
        status = "incomplete" if incomplete else "completed"
        return response.body(status, out.items, done.usage)
    return StreamingResponse(
        _stream(s, req, response, first, stream, shaper, forced, record),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _stream(
    s: OpenAIServing,
    req: ResponsesRequest,
    response: _Response,
    first: TokenDelta,
    stream: TokenStream,
    shaper: ChatShaper,
    forced: bool,
    record: RequestRecord,
) -> AsyncIterator[bytes]:
    event = _Events()
    out = _Output(forced)
    delta, chars = first, 0
    try:
        started = response.body("in_progress", [])
        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        while True:
            chars += len(delta.text)
            record.chars = chars
            if delta.usage is not None:
                record.usage_so_far = delta.usage
            elif delta.token_ids:  # an engine that reports usage only at the end
                record.tokens_sent += len(delta.token_ids)
            for piece in shaper.deltas(delta):
                for kind, fields in out.feed(piece):
                    yield event(kind, fields)
            if delta.finish_reason is not None:
                record.usage = delta.usage or Usage(0, 0)
                break
            if s.drain.expired:
                raise ServiceUnavailable(
                    "the server is shutting down; this stream was ended early",
                    code="shutting_down",
                )
            delta = await anext(stream)
        incomplete = delta.finish_reason == "length"
        for kind, fields in out.finish(incomplete):
            yield event(kind, fields)
        status = "incomplete" if incomplete else "completed"
        yield event(
            f"response.{status}", {"response": response.body(status, out.items, delta.usage)}
        )
    except LlmhostError as exc:
        # The status line is gone already: the error travels in-band, as OpenAI sends it.
        exc = _renamed(exc, forced)
        log.warning("stream %s failed: %s", response.head["id"], exc.message)
        record.error_status = exc.status_code
        error = {"code": exc.code or exc.error_type, "message": exc.message, "param": exc.param}
        yield event("error", error)
        code = "rate_limit_exceeded" if exc.status_code == 429 else "server_error"
        failed = response.body(
            "failed", out.snapshot(), error={"code": code, "message": exc.message}
        )
        yield event("response.failed", {"response": failed})
    finally:
        await stream.aclose()
