"""Request and response schemas of `POST /v1/responses`, OpenAI's Responses API in its stateless
form: input items (messages, function calls and their outputs), flat function tools and
`text.format`, each bounded and checked before anything is generated."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    field_validator,
    model_validator,
)

from llmhost.api.protocol import JsonInt, KeepAlive, PositiveInt, _not_bool
from llmhost.api.protocol_chat import (
    MAX_TOOLS,
    MAX_TOOLS_BYTES,
    NAME_SCHEMA,
    check_name,
    check_schema,
)

MAX_INPUT_ITEMS = 4096
MAX_PARTS = 256  # content parts of one message or one function output
MAX_ID = 256
ITEM_TYPES = ("message", "function_call", "function_call_output")
PART_TYPES = ("input_text", "output_text")
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys of 64 characters, values of 512
ItemStatus = Literal["in_progress", "completed", "incomplete"]
ItemId = Annotated[str, Field(max_length=MAX_ID)]
CallId = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
# The bounds before the check, so that the JSON schema states them inside the union with null.
Temperature = Annotated[float, Field(ge=0.0, le=2.0), BeforeValidator(_not_bool)]
TopP = Annotated[float, Field(gt=0.0, le=1.0), BeforeValidator(_not_bool)]
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- input ---------------------------------------------------------------------------------


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """A previous answer's text, as a client replays it."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = Field(
        None, max_length=1024, description="Accepted and ignored."
    )
    logprobs: list[Any] | None = Field(None, max_length=0, description="Accepted when empty.")


TextContent = Annotated[InputText | OutputText, Field(discriminator="type")]


def _text_parts(v: Any) -> Any:
    # Say which part is what, instead of pydantic's union error listing every alternative.
    if isinstance(v, list):
        if len(v) > MAX_PARTS:
            raise ValueError(f"{len(v)} content parts; at most {MAX_PARTS} are allowed")
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind not in PART_TYPES:
                raise ValueError(
                    f"content part {i} is of type {kind!r:.60}; the models served here take "
                    "text only ('input_text' or 'output_text' parts)"
                )
    return v


class MessageItem(_Strict):
    """A message; `type` may be left out (OpenAI's "easy" input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextContent]
    id: ItemId | None = Field(None, description="Accepted and ignored (a replayed item's id).")
    status: ItemStatus | None = Field(None, description="Accepted and ignored.")

    _parts = field_validator("content", mode="before")(lambda v: _text_parts(v))


class FunctionCallItem(_Strict):
    """A call the model made earlier, sent back with its output."""

    type: Literal["function_call"]
    call_id: CallId
    name: str = Field(..., json_schema_extra=NAME_SCHEMA)
    arguments: str = Field(description="The call's arguments as JSON text.")
    id: ItemId | None = Field(None, description="Accepted and ignored.")
    status: ItemStatus | None = Field(None, description="Accepted and ignored.")

    _name = field_validator("name")(lambda v: check_name(v, "input[].name"))


class FunctionCallOutputItem(_Strict):
    """What a function call returned."""

    type: Literal["function_call_output"]
    call_id: CallId
    output: str | list[TextContent]
    id: ItemId | None = Field(None, description="Accepted and ignored.")
    status: ItemStatus | None = Field(None, description="Accepted and ignored.")

    _parts = field_validator("output", mode="before")(lambda v: _text_parts(v))


def _item_type(v: Any) -> str | None:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)
    return None if kind is None else str(kind)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


# --- tools and text format -----------------------------------------------------------------


class FunctionTool(_Strict):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(..., json_schema_extra=NAME_SCHEMA)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    _name = field_validator("name")(lambda v: check_name(v, "tools[].name"))

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else check_schema(v, "tools[].parameters", object_only=True)


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


ResponsesToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class TextFormat(_Strict):
    """`text.format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(json_schema_extra=NAME_SCHEMA)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="With json_schema: the schema the output must match."
    )
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "text.format.name")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else check_schema(v, "text.format.schema", object_only=False)

    @model_validator(mode="after")
    def _fields_of_type(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("type 'json_schema' needs a name and a schema")
        if self.type != "json_schema" and (
            self.name is not None or self.schema_ is not None or self.strict is not None
        ):
            raise ValueError(
                f"name, schema and strict go with type 'json_schema', not {self.type!r}"
            )
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


def _refused(what: str, *, empty_ok: bool = False) -> Any:
    """A validator refusing any value but null (and [] where `empty_ok`), as the schema says."""

    def check(v: Any) -> Any:
        if v is None or (empty_ok and v == []):
            return v
        raise ValueError(what)

    return check


def _input_schema(schema: dict[str, Any]) -> None:
    """What `input` takes on the wire: a string, or a list of items."""
    items = schema.pop("items")
    schema.pop("type", None)
    schema["anyOf"] = [
        {"type": "string"},
        {"type": "array", "items": items, "minItems": 1, "maxItems": MAX_INPUT_ITEMS},
    ]


# --- the request ---------------------------------------------------------------------------


class ResponsesRequest(BaseModel):
    """A Responses API request. Nothing is stored: each request carries its whole
    conversation in `input`."""

    # A field llmhost does not know is refused with a 400 naming it, never dropped silently.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id; defaults to the served model.")
    input: list[InputItem] = Field(
        ...,
        description="Text (one user message) or up to 4096 items: messages, function_call "
        "and function_call_output items.",
        json_schema_extra=_input_schema,
    )
    instructions: str | None = Field(None, description="A system message put first.")
    tools: list[FunctionTool] | None = Field(None, description="Function tools, at most 128.")
    tool_choice: ResponsesToolChoice | None = Field(
        None, description="auto (the default with tools), none, required, or one function."
    )
    parallel_tool_calls: StrictBool | None = Field(
        None, description="Whether one answer may hold several calls (default true)."
    )
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = Field(None, description="Tokens to generate.")
    temperature: Temperature | None = Field(None, description="Default 1.")
    top_p: TopP | None = Field(None, description="Default 1.")
    seed: JsonInt | None = Field(None, description="Extension: any integer; used modulo 2**64.")
    keep_alive: KeepAlive = None
    stream: StrictBool = False
    store: StrictBool | None = Field(
        None,
        description="Accepted, but nothing is stored whatever its value: the response's store "
        "is false and it cannot be continued by id.",
    )
    previous_response_id: str | None = Field(
        None,
        description="Refused: responses are not stored; send the whole conversation in input.",
        json_schema_extra={"type": "null"},
    )
    metadata: Metadata | None = Field(
        None, max_length=MAX_METADATA, description="Echoed back; changes nothing here."
    )
    user: str | None = Field(
        None,
        max_length=256,
        description="Accepted and ignored (the audit log names the authenticated principal).",
    )
    reasoning: Any = Field(
        None,
        description="Refused unless null: the models served here have no reasoning control.",
        json_schema_extra={"type": "null"},
    )
    include: list[str] | None = Field(
        None,
        description="Refused unless empty: there is nothing more to include.",
        json_schema_extra={"maxItems": 0},
    )
    truncation: Literal["disabled"] | None = Field(
        None, description="Only 'disabled': a conversation too long for the context is a 400."
    )

    _no_previous = field_validator("previous_response_id")(
        _refused(
            "responses are not stored on this server, so a response cannot be continued by id; "
            "send the whole conversation in input"
        )
    )
    _no_reasoning = field_validator("reasoning")(
        _refused("reasoning is not supported: the models served here have no reasoning control")
    )
    _no_include = field_validator("include")(
        _refused("include is not supported: there is nothing more to include", empty_ok=True)
    )

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        # Counted and typed before any item is parsed, with a message naming the odd item.
        if isinstance(v, str):
            return [{"type": "message", "role": "user", "content": v}]
        if not isinstance(v, list):
            raise ValueError("input must be a string or a list of items")
        if not v:
            raise ValueError("input must not be empty")
        if len(v) > MAX_INPUT_ITEMS:
            raise ValueError(f"{len(v)} input items; at most {MAX_INPUT_ITEMS} are allowed")
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                raise ValueError(f"input[{i}] must be an object")
            kind = item.get("type", "message")
            if kind not in ITEM_TYPES:
                raise ValueError(
                    f"input[{i}] is of type {kind!r:.60}; this server takes message, "
                    "function_call and function_call_output items (it stores nothing, so "
                    "items cannot be referenced by id)"
                )
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        # Counted before each tool's schema is checked, so 10,000 tools cost nothing.
        if not isinstance(v, list):
            return v
        if len(v) > MAX_TOOLS:
            raise ValueError(f"{len(v)} tools were sent; at most {MAX_TOOLS} are allowed")
        for i, tool in enumerate(v):
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            if kind != "function":
                raise ValueError(
                    f"tools[{i}] is of type {kind!r:.60}; only function tools are served here"
                )
        size = len(json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str))
        if size > MAX_TOOLS_BYTES:
            raise ValueError(f"tools are {size} bytes as JSON; at most {MAX_TOOLS_BYTES}")
        return v


# --- the response --------------------------------------------------------------------------


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextPart]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = Field(description="The call's arguments as JSON text.")
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """A response as OpenAI's Responses API returns it; the request's settings are echoed."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    max_output_tokens: int | None
    text: dict[str, Any]
    store: Literal[False] = False
    metadata: dict[str, str]
    user: str | None
    previous_response_id: None = None
    reasoning: None = None
    truncation: Literal["disabled"] = "disabled"
    background: Literal[False] = False
