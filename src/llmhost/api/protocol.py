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
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict
from typing_extensions import Self

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
from llmhost.engines.pool import keep_alive_seconds

__all__ = ["ChatMessage", "TextPart"]

MAX_STOP_STRINGS = 16
MAX_CHOICES = 128  # n, times the prompts of a completion request
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_TOP_LOGPROBS = 20


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


def _keep_alive(v: Any) -> float | None:
    if v is None:
        return None
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise ValueError("keep_alive is seconds (a number) or a duration like 5m")
    return keep_alive_seconds(v)


# Ollama's keep_alive: how long the model stays loaded after this request.
KeepAlive = Annotated[
    float | None,
    BeforeValidator(_keep_alive),
    Field(
        description="Extension (Ollama's): how long the model stays loaded once idle after "
        "this request, in seconds or as 30s, 5m, 2h, 1d (0: unload at once; at most 30 days).",
        json_schema_extra={
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": 2592000},
                {"type": "string", "pattern": "^[0-9]{1,7}(ms|s|m|h|d)?$"},
                {"type": "null"},
            ]
        },
    ),
]


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
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices to generate; they share the prompt's prefill and run together, "
        "so at most the engine's parallel sequences. Choice i is seeded with seed + i.",
    )
    presence_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: JsonFloat = Field(1.0, gt=0.0, le=10.0, description="Extension.")
    ignore_eos: StrictBool = Field(
        False, description="Extension: generate max_tokens regardless of EOS."
    )
    keep_alive: KeepAlive = None
    cache_prompt: StrictBool = Field(
        True,
        description="Extension (llama-server's): reuse the cached KV of this prompt's longest "
        "cached prefix and keep this prompt's for later requests; false: prefill it all.",
    )
    logit_bias: dict[str, JsonFloat] | None = Field(
        None,
        description="Token id (as a string) -> bias added to its logit, -100..100.",
        json_schema_extra={
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
    )
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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _few_biases(cls, v: Any) -> Any:
        # Counted before each entry is checked, so a huge map costs nothing.
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(v)} logit_bias entries; at most {MAX_LOGIT_BIAS}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys are token ids, got {key!r:.40}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {key} is {bias}; it must be -100..100")
        ids = [int(k) for k in v or ()]
        if len(set(ids)) != len(ids):
            raise ValueError("logit_bias names a token id twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())


def _few_prompts(v: Any) -> Any:
    # Counted before the items are checked, so 10,000 prompts cost nothing.
    if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) > MAX_CHOICES:
        raise ValueError(f"{len(v)} prompts were sent; at most {MAX_CHOICES} per request")
    return v


_TOKEN_IDS: JsonDict = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[
        str | list[str] | list[JsonInt] | list[list[JsonInt]], BeforeValidator(_few_prompts)
    ] = Field(
        ...,
        description=f"Text, token ids, or a list of up to {MAX_CHOICES} of either (each its "
        "own choices).",
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": MAX_CHOICES,
                },
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_CHOICES},
            ]
        },
    )
    max_tokens: JsonInt | None = Field(
        16,
        ge=0,
        description="Tokens to generate; null: fill context; 0 only with echo (score a prompt).",
    )
    logprobs: JsonInt | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Report each token's log-probability with this many likeliest alternatives.",
    )
    echo: StrictBool = Field(
        False, description="Return the prompt before the completion (with logprobs: scored)."
    )
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            for p in v:
                if isinstance(p, list) and not p:
                    raise ValueError("a prompt of token ids must not be empty")
                if (isinstance(p, int) and p < 0) or (isinstance(p, list) and min(p) < 0):
                    raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing; it is only allowed with echo")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(
                f"{len(self.prompts)} prompts x n={self.n} is more than {MAX_CHOICES} choices"
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice group: a string or token ids each."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = Field(False, description="Report each output token's log-probability.")
    top_logprobs: JsonInt | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: this many likeliest alternatives at each position.",
    )
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

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, the alternatives as token -> log-probability."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    context_length: int | None = Field(description="Per sequence; null until loaded.")
    state: Literal["loaded", "loading", "unloaded"] | None = None
    kind: Literal["chat", "embedding", "rerank"] | None = None


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
