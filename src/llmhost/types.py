"""Engine-neutral request and response types passed between the api layer and the engines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Constraint:
    """Output held to a grammar by constrained decoding. `kind` "json_schema": `source` is the
    JSON schema as JSON text; "json_object": any JSON object (`source` unused); "lark": `source`
    is a grammar in llguidance's Lark dialect (which can embed JSON schemas)."""

    kind: Literal["json_schema", "json_object", "lark"]
    source: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    ignore_eos: bool = False
    constraint: Constraint | None = None
    # Added to the logits of these token ids before penalties (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Report each generated token's log-probability and this many likeliest alternatives
    # (0..20); None: none. Log-probabilities are taken after logit_bias, the grammar and the
    # penalties, before temperature and truncation (OpenAI's definition).
    logprobs: int | None = None
    # Also report the prompt tokens' log-probabilities (from the raw logits) with this many
    # alternatives; None: none. The prompt is then prefilled whole, not reused from a cache.
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a rendered prompt (text or token ids) and how to sample it. A chat
    request also carries its messages, whole, for engines that apply the template themselves
    (a remote server); the others use the prompt, rendered from the model's template.
    `forward` holds the OpenAI fields a remote engine passes to its upstream unchanged (tools,
    tool_choice, parallel_tool_calls, response_format); in-process engines get them as a
    rendered prompt and a `sampling.constraint` instead."""

    prompt: str | list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    add_special: bool = True
    messages: tuple[dict[str, Any], ...] | None = None
    forward: Mapping[str, Any] | None = None
    # Reuse the longest cached prefix of this prompt's KV and keep its KV for later requests
    # (llama-server's `cache_prompt`); False: prefill from the first token, keep nothing.
    cache_prompt: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the likeliest alternatives at its position, by token
    id, likeliest first. A prompt's first token has no log-probability (None)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """One step of a stream: new text (may be empty), the usage so far where the engine
    knows it, and on the last delta the finish reason and the final usage."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # OpenAI-shaped tool-call delta fragments from an engine that parses tool calls itself (a
    # remote upstream); in-process engines leave this empty and the api layer parses the text.
    tool_calls: tuple[dict[str, Any], ...] = ()
    # With `sampling.logprobs`: one entry per token of `token_ids`. With
    # `sampling.prompt_logprobs`, the first delta also carries one per prompt token.
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    context_length: int
    owned_by: str = "llmhost"
    created: int = 0


@dataclass
class EngineHealth:
    ok: bool
    detail: str = ""
    stats: dict[str, float] = field(default_factory=dict)
