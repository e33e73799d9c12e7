"""The engine protocol: the only thing the api layer knows about inference."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from llmhost.errors import ContextLengthExceeded, InvalidRequest
from llmhost.types import EngineHealth, GenerationRequest, ModelInfo, TokenDelta

if TYPE_CHECKING:
    from llmhost.config import Settings


class TokenStream(Protocol):
    """What `Engine.stream` returns: deltas as they come, and `aclose` to stop early."""

    def __aiter__(self) -> AsyncIterator[TokenDelta]: ...
    async def __anext__(self) -> TokenDelta: ...
    async def aclose(self) -> None: ...


class Engine(abc.ABC):
    """A loaded model that streams generations.

    Implement `start`, `close`, `stream`, `tokenize` and `health`; set `model_info`,
    `chat_template` and the special token strings when the model is loaded.
    `stream` yields TokenDelta objects; the last one has `finish_reason` and `usage`.
    `health().stats` may report the prompt cache with these keys (cumulative counts, for
    Prometheus counters): `prefix_cache_queries` (prompt tokens looked up),
    `prefix_cache_hits` (of those, tokens found cached and not prefilled again),
    `prefix_cache_requests_hit` (requests that reused at least one token), and gauges
    `prompt_cache_bytes` / `prompt_cache_budget_bytes` (host memory held by cached prefixes
    outside the sequence slots, and its budget).
    Errors in the request (too long, bad parameters) must be raised before the first delta so
    the server can still answer with a proper HTTP error. Closing the iterator early (client
    gone) must free whatever the request held.
    """

    name: str = "engine"
    # What it serves: "chat" (completions and chat), "embedding" (`embed`) or "rerank".
    kind: str = "chat"
    # What the engine honours (simonw/llm's style); the api layer answers a request that needs
    # more with a 400 naming the field.
    supports_tools: bool = False  # tools, tool_choice, parallel_tool_calls, tool messages
    supports_schema: bool = False  # response_format json_object / json_schema
    # Applies the chat template and parses tool calls itself (a remote server): it gets the
    # messages and `GenerationRequest.forward` instead of a rendered prompt and a constraint.
    remote: bool = False
    supports_logprobs: bool = False  # logprobs, top_logprobs, echo with logprobs
    supports_logit_bias: bool = False
    # Sequences that can run at once: a request's n choices run together, so n is held to
    # it (a 400 naming the limit). None: no fixed limit.
    max_sequences: int | None = None
    # The tool-call format of the model (a name in engines.toolcalls), found from its chat
    # template when loaded; a setting may override it.
    tool_parser: str | None = None
    model_info: ModelInfo
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """The engine the server settings describe (the registry builds engines this way);
        nothing is loaded until start()."""
        raise NotImplementedError(f"the {cls.name} engine cannot be built from settings")

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; may take long, runs before the server reports ready."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel outstanding work and free the model."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> TokenStream:
        """Generate for one request (an async generator, most simply); the server closes it
        early when the client goes away."""

    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text` as this model's tokenizer sees it."""

    @abc.abstractmethod
    def health(self) -> EngineHealth:
        """Cheap liveness of the loaded engine, with optional statistics."""

    async def embed(self, inputs: list[list[int]]) -> list[Any]:
        """One unit vector (a float32 numpy array) per input of token ids; engines of kind
        "embedding" implement it."""
        raise NotImplementedError(f"the {self.name} engine does not embed")

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for (special tokens as their text), which logprobs
        report; engines with `supports_logprobs` implement it."""
        raise NotImplementedError(f"the {self.name} engine does not report tokens")


def check_token_ids(ids: Sequence[int], n_vocab: int, param: str, where: str = "") -> None:
    """Every id names a token of the vocabulary (a 400 naming `param` otherwise)."""
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad}{where} is outside the vocabulary (0..{n_vocab - 1})", param=param
        )


def check_context(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """Validate a request against the per-sequence context and return the generation budget."""
    if prompt_tokens == 0:
        raise ContextLengthExceeded("the prompt is empty after tokenization", param="prompt")
    if prompt_tokens >= context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens; the prompt has "
            f"{prompt_tokens} tokens. Shorten the prompt.",
            param="prompt",
        )
    room = context_length - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens; you asked for "
            f"{prompt_tokens} prompt + {max_tokens} completion tokens. Lower max_tokens to at "
            f"most {room} or shorten the prompt.",
            param="max_tokens",
        )
    return max_tokens


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of a stop string.

    Text that might be the beginning of a stop string is held back until the next piece
    decides it; `feed` returns what is safe to emit and whether a stop string was hit.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
