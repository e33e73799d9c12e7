"""A scripted engine for tests: emits known tokens, records every request it was given, and
tracks how many streams are running, so api behaviour can be checked without a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from llmhost.engines.base import Engine, StopMatcher, check_context
from llmhost.errors import EngineNotReady
from llmhost.types import (
    EngineHealth,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    TokenDelta,
    TokenLogprob,
    Usage,
)

if TYPE_CHECKING:
    from llmhost.config import Settings

DEFAULT_SCRIPT = ("Hello", " from", " the", " fake", " engine", ".")


class FakeEngine(Engine):
    """Tokens are whitespace-separated words; output cycles through `script`."""

    name = "fake"
    # Tools are rendered into the prompt and the scripted text is parsed for calls; the fake
    # constrains nothing, so structured outputs and forced tool choices are refused.
    supports_tools = True
    # Scripted log-probabilities: the scripted word is always the likeliest, at -0.25, and
    # the other words follow at -2, -3, ... (token id of word i: i + 1).
    supports_logprobs = True

    def __init__(
        self,
        *,
        model_id: str = "fake-model",
        script: Sequence[str] = DEFAULT_SCRIPT,
        context_length: int = 256,
        token_delay: float = 0.0,
        eos_after: int | None = None,
        chat_template: str | None = None,
        max_sequences: int | None = None,
    ):
        self.model_info = ModelInfo(id=model_id, context_length=context_length)
        self.script = tuple(script)
        self.token_delay = token_delay
        self.eos_after = eos_after
        self.chat_template = chat_template
        self.max_sequences = max_sequences  # as an engine with that many slots holds n to it
        self.requests: list[GenerationRequest] = []
        self.active = 0
        self.cancelled = 0
        self.started = False

    @classmethod
    def from_settings(cls, settings: Settings) -> FakeEngine:
        return cls(
            model_id=settings.model_name or "fake-model",
            context_length=settings.ctx_size or 256,
            max_sequences=settings.parallel,
        )

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        # Text without words is one token, as a real tokenizer's BOS makes it.
        return [hash(w) & 0xFFFF for w in text.split()] or [0]

    def token_bytes(self, token: int) -> bytes:
        if 1 <= token <= len(self.script):
            return self.script[token - 1].encode("utf-8")
        return f"<{token}>".encode()

    def _logprob(self, token: int, k: int) -> TokenLogprob:
        others = [t for t in range(1, len(self.script) + 1) if t != token]
        top = [(token, -0.25)] + [(t, -2.0 - i) for i, t in enumerate(others)]
        return TokenLogprob(token, -0.25, tuple(top[:k]))

    def health(self) -> EngineHealth:
        return EngineHealth(ok=self.started, stats={"active": self.active})

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if not self.started:
            raise EngineNotReady("the fake engine is not started")
        n_prompt = (
            len(request.prompt)
            if isinstance(request.prompt, list)
            else len(self.tokenize(request.prompt))
        )
        sp = request.sampling
        budget = check_context(n_prompt, sp.max_tokens, self.model_info.context_length)
        self.requests.append(request)
        self.active += 1
        stops = StopMatcher(sp.stop)
        produced = 0
        finish: FinishReason = "length"
        try:
            while produced < budget:
                if self.eos_after is not None and produced >= self.eos_after and not sp.ignore_eos:
                    finish = "stop"
                    break
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                token = produced % len(self.script) + 1
                word = self.script[token - 1]
                produced += 1
                lps = () if sp.logprobs is None else (self._logprob(token, sp.logprobs),)
                text, hit = stops.feed(word)
                if hit:
                    finish = "stop"
                    if text:
                        yield TokenDelta(text=text, token_ids=(token,), logprobs=lps)
                    break
                yield TokenDelta(
                    text=text, token_ids=(token,), usage=Usage(n_prompt, produced), logprobs=lps
                )
            tail = "" if finish == "stop" else stops.flush()
            yield TokenDelta(text=tail, finish_reason=finish, usage=Usage(n_prompt, produced))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
