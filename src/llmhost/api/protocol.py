"""Request and response schemas of the OpenAI-compatible API (the subset llmhost serves)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from llmhost.api.protocol_chat import (
    MAX_DOCUMENTS,
    MAX_TOOLS,
    MAX_TOOLS_BYTES,
    ChatMessage,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)

__all__ = ["ChatMessage", "TextPart"]

MAX_STOP_STRINGS = 16


def _not_bool(v: Any) -> Any:
    # JSON Schema's numbers are not booleans; pydantic's lax mode would read true as 1.
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


# Request fields take the JSON types their schema names: a number where a number is due
# (1.0 is the integer 1, as JSON Schema has it; true is not), and a boolean only as true/false.
JsonInt = Annotated[int, BeforeValidator(_not_bool)]
JsonFloat = Annotated[float, BeforeValidator(_not_bool)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_not_bool)]


def _stop_schema(schema: dict[str, Any]) -> None:
    """What `stop` takes on the wire: a string, a list of up to 16, or null."""
    text = {"type": "string", "minLength": 1}
    schema.pop("type", None)
    schema.pop("items", None)
    schema["anyOf"] = [
        text,
        {"type": "array", "items": text, "maxItems": MAX_STOP_STRINGS},
        {"type": "null"},
    ]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    # A field llmhost does not know is refused with a 400 naming it, never dropped silently;
    # the few that change nothing here are declared below as accepted and ignored.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "dependentSchemas": {
                "stream_options": {
                    "properties": {"stream": {"const": True}},
                    "required": ["stream"],
                }
            }
        },
    )

    model: str | None = Field(None, description="Model id; defaults to the served model.")
    temperature: JsonFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: JsonInt = Field(-1, ge=-1, description="Extension: keep the k likeliest; -1 or 0: off.")
    min_p: JsonFloat = Field(0.0, ge=0.0, le=1.0, description="Extension.")
    seed: JsonInt | None = Field(None, description="Any integer; used modulo 2**64.")
    stop: list[str] = Field(
        default_factory=list,
        description="A string or up to 16 strings.",
        json_schema_extra=_stop_schema,
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: JsonInt = Field(
        1, ge=1, description="Only 1 is supported.", json_schema_extra={"maximum": 1}
    )
    presence_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: JsonFloat = Field(1.0, gt=0.0, le=10.0, description="Extension.")
    ignore_eos: StrictBool = Field(
        False, description="Extension: generate max_tokens regardless of EOS."
    )
    cache_prompt: StrictBool = Field(
        True,
        description="Extension (llama-server's): reuse the cached KV of this prompt's longest "
        "cached prefix and keep this prompt's for later requests; false: prefill it all.",
    )
    # Refused when set (see _unsupported); the schema says so, so clients and fuzzers know.
    logprobs: bool | int | None = Field(None, json_schema_extra={"enum": [False, 0, None]})
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    # Accepted and deliberately ignored: they ask the OpenAI service to store, tag, route or
    # cache on its side, which changes nothing in what is generated here.
    user: str | None = Field(
        None, description="Accepted and ignored (the audit log names the authenticated principal)."
    )
    store: StrictBool | None = Field(None, description="Accepted and ignored: nothing is stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_forms(cls, v: object) -> object:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError("n > 1 is not supported; send separate requests")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[JsonInt] = Field(
        ...,
        description="Text, [text] or token ids.",
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        },
    )
    max_tokens: PositiveInt | None = Field(
        16, description="Tokens to generate; null: fill context."
    )
    echo: StrictBool = Field(False, json_schema_extra={"enum": [False]})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(p, str) for p in v):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                return v[0]
            if any(p < 0 for p in v):
                raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = Field(None, description="Deprecated alias of the below.")
    max_completion_tokens: PositiveInt | None = Field(None)
    tools: list[Tool] | None = Field(None, description="Function tools, at most 128.")
    tool_choice: ToolChoice | None = Field(
        None, description="auto (the default with tools), none, required, or one function."
    )
    parallel_tool_calls: StrictBool = Field(
        True, description="Whether one answer may hold several calls."
    )
    response_format: ResponseFormat | None = None
    documents: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_DOCUMENTS,
        description="Extension: documents for templates that take them (RAG).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension: more variables for the chat template."
    )

    @field_validator("tools", mode="before")
    @classmethod
    def _few_tools(cls, v: Any) -> Any:
        # Counted before each tool's schema is checked, so 10,000 tools cost nothing.
        if isinstance(v, list) and len(v) > MAX_TOOLS:
            raise ValueError(f"{len(v)} tools were sent; at most {MAX_TOOLS} are allowed")
        size = len(json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str))
        if size > MAX_TOOLS_BYTES:
            raise ValueError(f"tools are {size} bytes as JSON; at most {MAX_TOOLS_BYTES}")
        return v

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class GenerateRequest(BaseModel):
    """The deployment guide's minimal interface. `max_length` counts prompt and output tokens
    together, as in transformers' generate(); `max_new_tokens` counts output only."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1)
    max_length: JsonInt = Field(50, ge=1)
    max_new_tokens: PositiveInt | None = Field(None)
    temperature: JsonFloat = Field(0.0, ge=0.0, le=2.0)
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    seed: JsonInt | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The text; null when the answer is only tool calls.")
    tool_calls: list[ToolCall] | None = Field(
        None,
        description="The calls the model made; present only when it made some.",
        exclude_if=lambda v: v is None,
    )

    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str | None
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error's body, as OpenAI's API shapes it."""

    error: ErrorDetail
