"""The chat-specific request schemas: whole messages (content parts, tool calls, tool results),
function tools, `tool_choice` and `response_format`, each checked before anything is generated."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic.json_schema import JsonDict

MAX_TOOLS = 128  # OpenAI's own limit
MAX_SCHEMA_BYTES = 64 * 1024  # one tool's parameters or one response schema, as JSON
MAX_TOOLS_BYTES = 512 * 1024  # all tools together
MAX_DOCUMENTS = 64
# Names as OpenAI takes them: ^[a-zA-Z0-9_-]{1,64}$ (checked without a regex).
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
NAME_SCHEMA: JsonDict = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}


def check_name(name: str, what: str) -> str:
    if not 1 <= len(name) <= 64 or not NAME_CHARS.issuperset(name):
        raise ValueError(f"{what} must be 1 to 64 letters, digits, '_' or '-', got {name!r:.80}")
    return name


def check_schema(schema: Any, what: str, *, object_only: bool) -> dict[str, Any]:
    """The cheap checks of a JSON schema a request carries, done while the body is parsed: a
    JSON object of at most MAX_SCHEMA_BYTES, describing an object where that is required.
    Its validity as JSON Schema costs more and is checked off the event loop (`schema_error`)."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON schema object")
    size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{what} is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed")
    if object_only and schema.get("type", "object") != "object":
        raise ValueError(f"{what} must describe an object (type 'object')")
    return schema


def schema_error(schema: dict[str, Any], what: str) -> str | None:
    """Why `schema` is not a valid JSON Schema (2020-12) or can match nothing because a
    reference leads back to itself, or None. About 2 ms a KiB: run it in a worker thread."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path) or "(root)"
        return f"{what} is not a valid JSON schema at {path}: {exc.message:.200}"
    loop = _ref_cycle(schema)
    if loop:
        return (
            f"{what} can match nothing: its reference {loop!r:.120} leads back to itself "
            "without describing any value"
        )
    return None


# Keywords that describe a value themselves; a schema holding one is more than a reference.
_CONSTRUCTORS = frozenset(
    ("type", "properties", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "not")
)


def _ref_target(root: dict[str, Any], ref: str) -> Any:
    """The local schema `ref` names (#, #/$defs/x, #/definitions/x), or None."""
    if ref == "#":
        return root
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            defs = root.get(prefix[2:-1])
            return defs.get(ref[len(prefix) :]) if isinstance(defs, dict) else None
    return None


def _ref_cycle(root: dict[str, Any]) -> str | None:
    """A `$ref` that, following only bare references (and allOf of them), comes back to
    itself: recursion with no value in between, which no JSON value can end."""
    starts = [root]
    for key in ("$defs", "definitions"):
        defs = root.get(key)
        if isinstance(defs, dict):
            starts += [d for d in defs.values() if isinstance(d, dict)]
    for start in starts:
        seen: set[int] = set()
        todo = [start]
        while todo:
            node = todo.pop()
            if id(node) in seen:
                if node is start:
                    return str(start.get("$ref", "#"))
                continue
            seen.add(id(node))
            if _CONSTRUCTORS.intersection(node):
                continue
            nexts = [node.get("$ref")] if isinstance(node.get("$ref"), str) else []
            nexts += [a.get("$ref") for a in node.get("allOf") or () if isinstance(a, dict)]
            for ref in nexts:
                target = _ref_target(root, ref) if isinstance(ref, str) else None
                if isinstance(target, dict):
                    if target is start:
                        return ref
                    todo.append(target)
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="The call's arguments as JSON text.")


class ToolCall(_Strict):
    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


def _text_parts(v: Any) -> Any:
    # Only text goes into these models; say which part is what, instead of pydantic's union
    # error listing every alternative.
    if isinstance(v, list):
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(
                    f"content part {i} is of type {kind!r}; the models served here take text "
                    "only ('text' parts)"
                )
    return v


class ChatMessage(BaseModel):
    """One message, kept whole: the chat template gets every field (tool calls, tool results,
    names, reasoning text) as transformers' apply_chat_template would."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None, Field(None)] = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    # Sent back by clients that replay a reasoning model's answer; templates use it.
    reasoning_content: str | None = None
    # Fields of an assistant message the openai SDK hands back that change nothing here.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    _content_parts = field_validator("content", mode="before")(lambda v: _text_parts(v))

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template (or an upstream server) gets it: what was sent,
        without the fields that are only accepted for the client's convenience."""
        return self.model_dump(
            exclude_none=True, exclude={"refusal", "annotations", "audio", "function_call"}
        )


class FunctionDef(_Strict):
    name: str = Field(..., json_schema_extra=NAME_SCHEMA)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    _name = field_validator("name")(lambda v: check_name(v, "tools[].function.name"))

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        return check_schema(v, "function.parameters", object_only=True)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Strict):
    name: str = Field(..., json_schema_extra=NAME_SCHEMA)
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        alias="schema",
        description="The JSON schema the output must match.",
    )
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    _name = field_validator("name")(lambda v: check_name(v, "response_format.json_schema.name"))

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_schema(v, "response_format.json_schema.schema", object_only=False)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(
                f"json_schema is only allowed with type 'json_schema', not {self.type!r}"
            )
        return self


def check_conversation(messages: list[ChatMessage]) -> None:
    """Every tool result answers a tool call an earlier assistant message made."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.tool_calls or ():
            called.add(call.id)
        if m.role == "tool" and m.tool_call_id not in called:
            raise ValueError(
                f"messages[{i}] answers tool_call_id {m.tool_call_id!r:.80}, which no earlier "
                "assistant message called"
            )


def check_tools(tools: list[Tool] | None) -> None:
    """Tools, when given, are uniquely named. Their count and size are checked before they
    are parsed (ChatCompletionRequest._few_tools)."""
    if tools is None:
        return
    if not tools:
        raise ValueError("tools must not be empty; leave it out instead")
    seen: set[str] = set()
    for t in tools:
        if t.function.name in seen:
            raise ValueError(f"two tools are named {t.function.name!r}")
        seen.add(t.function.name)


def check_tool_choice(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    """A tool_choice other than none needs tools, and a named one names one of them."""
    if choice is None or choice == "none":
        return
    if not tools:
        raise ValueError("tool_choice is only allowed when tools are given")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {
        t.function.name for t in tools
    }:
        raise ValueError(f"tool_choice names {choice.function.name!r:.80}, which is not in tools")
