"""Request logic behind the OpenAI routes: resolve the model, render the prompt, run the engine,
and shape the result as a JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi.responses import StreamingResponse

from llmhost.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _SamplingRequest,
)
from llmhost.api.serving_chat import ChatShaper, check_schemas, gather_remote_calls, plan_chat
from llmhost.api.sse import (
    CHAT,
    COMPLETION,
    SSE_HEADERS,
    ChunkWriter,
    Kind,
    chunk_choices,
    sse,
    whole_choice,
)
from llmhost.engines.base import Engine
from llmhost.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    LlmhostError,
    ModelNotFound,
    ServiceUnavailable,
)
from llmhost.observability.metrics import Metrics
from llmhost.types import GenerationRequest, SamplingParams, TokenDelta, Usage

log = logging.getLogger("llmhost.api")


def check_text(text: str, param: str) -> None:
    """Refuse text no tokenizer can take: lone surrogates (JSON allows `\\ud800`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{param} holds a lone surrogate (U+{ord(exc.object[exc.start]):04X} at character "
            f"{exc.start}), which is not valid Unicode text",
            param=param,
        ) from None


class Drain:
    """A graceful shutdown in progress: streams still running when its time is nearly up end
    in-band (an error event, then [DONE]) instead of being cut, so clients and the audit log
    see why. `begin` may be called from a signal handler."""

    def __init__(self) -> None:
        self.expired = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._armed = False

    def begin(self, timeout: float) -> None:
        if self._armed or self.loop is None:
            return
        self._armed = True
        # Leave the last fifth of the grace (at most a second) for the ends to be sent.
        grace = max(0.0, timeout - min(1.0, timeout * 0.2))
        self.loop.call_soon_threadsafe(self.loop.call_later, grace, self._expire)

    def _expire(self) -> None:
        self.expired = True


def _usage(u: Usage | None) -> dict[str, int]:
    u = u or Usage(0, 0)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def usage_noted(notes: dict[str, Any]) -> dict[str, int]:
    """The usage a request's notes hold: the final usage, else what was produced so far (a
    stream dropped midway, a request cut by shutdown), else zeros."""
    if notes.get("usage"):
        return notes["usage"]
    so_far = notes.get("usage_so_far")
    if so_far is not None:
        return _usage(so_far)
    return _usage(Usage(0, int(notes.get("tokens_sent", 0))))


class _TextShaper:
    """Completions: the text as it comes."""

    def deltas(self, d: TokenDelta) -> list[dict[str, Any]]:
        return [{"text": d.text}] if d.text else []

    def finish_reason(self, reason: str | None) -> str | None:
        return reason

    def message(self, text: str, remote_calls: list[dict[str, Any]]) -> dict[str, Any]:
        return {"text": text}


class _Measured:
    """Wraps an engine stream whose first delta has arrived: observes TTFT now, and TPOT and
    token counts when the last delta (with usage) passes through."""

    def __init__(
        self,
        inner: AsyncIterator[TokenDelta],
        metrics: Metrics,
        model: str,
        t0: float,
        first: TokenDelta,
    ):
        self.inner, self.metrics, self.model = inner, metrics, model
        self.t_first = time.perf_counter()
        metrics.ttft.labels(model).observe(self.t_first - t0)
        self._check(first)

    def _check(self, d: TokenDelta) -> None:
        if d.finish_reason is not None and d.usage is not None:
            self.metrics.observe_finish(self.model, time.perf_counter() - self.t_first, d.usage)

    def __aiter__(self) -> _Measured:
        return self

    async def __anext__(self) -> TokenDelta:
        d = await anext(self.inner)
        self._check(d)
        return d

    async def aclose(self) -> None:
        await self.inner.aclose()


class OpenAIServing:
    """Turns API requests into engine requests and engine deltas into API responses."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics | None = None,
        drain: Drain | None = None,
        *,
        tool_parser: str | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.drain = drain or Drain()
        self.tool_parser = tool_parser  # a setting's override of the model's tool-call format
        # OpenAI's `created`: when the model was registered; here, when it was loaded
        self.created = engine.model_info.created or int(time.time())

    @property
    def model_id(self) -> str:
        return self.engine.model_info.id

    def model_card(self) -> dict[str, Any]:
        info = self.engine.model_info
        return {
            "id": info.id,
            "object": "model",
            "created": self.created,
            "owned_by": info.owned_by,
            "context_length": info.context_length,
        }

    def check_model(self, requested: str | None) -> str:
        if requested and requested != self.model_id:
            raise ModelNotFound(
                f"The model '{requested}' does not exist; this server serves '{self.model_id}'.",
                param="model",
            )
        return self.model_id

    @staticmethod
    def sampling(req: _SamplingRequest, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            seed=None if req.seed is None else req.seed % 2**64,
            stop=tuple(req.stop or ()),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repeat_penalty=req.repetition_penalty,
            ignore_eos=req.ignore_eos,
        )

    async def _start(
        self, gen: GenerationRequest, model: str
    ) -> tuple[TokenDelta, AsyncIterator[TokenDelta]]:
        """Run the engine up to its first delta, so request errors surface before any byte of
        the response is sent. With metrics, the stream observes TTFT, TPOT and tokens."""
        t0 = time.perf_counter()
        if isinstance(gen.prompt, str):
            check_text(gen.prompt, "messages" if gen.messages is not None else "prompt")
            for stop in gen.sampling.stop:
                check_text(stop, "stop")
        stream = self.engine.stream(gen)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        if self.metrics is not None:
            stream = _Measured(stream, self.metrics, model, t0, first)
        return first, stream

    @staticmethod
    async def _collect(
        first: TokenDelta, stream: AsyncIterator[TokenDelta], notes: dict[str, Any]
    ) -> TokenDelta:
        parts = [first.text]
        calls: dict[int, dict[str, Any]] = {}
        gather_remote_calls(calls, first.tool_calls)
        last = first
        notes["usage_so_far"] = first.usage
        try:
            while last.finish_reason is None:
                last = await anext(stream)
                parts.append(last.text)
                gather_remote_calls(calls, last.tool_calls)
                if last.usage is not None:
                    notes["usage_so_far"] = last.usage
        finally:
            await stream.aclose()
        return TokenDelta(
            text="".join(parts),
            finish_reason=last.finish_reason,
            usage=last.usage,
            tool_calls=tuple(calls[i] for i in sorted(calls)),
        )

    async def _respond(
        self,
        req: _SamplingRequest,
        gen: GenerationRequest,
        model: str,
        kind: Kind,
        notes: dict[str, Any],
        shaper: Any = None,
    ) -> dict[str, Any] | StreamingResponse:
        """Run `gen` and answer as one JSON body, or as SSE chunks when `req.stream`. What the
        audit log needs (model, prompt, usage, length of the text) is left in `notes`."""
        notes.update(model=model, prompt=gen.prompt, stream=bool(req.stream))
        shaper = shaper or _TextShaper()
        first, stream = await self._start(gen, model)
        head = {
            "id": f"{kind.id_prefix}-{gen.request_id}",
            "created": int(time.time()),
            "model": model,
        }
        if not req.stream:
            done = await self._collect(first, stream, notes)
            notes.update(usage=_usage(done.usage), chars=len(done.text))
            body = shaper.message(done.text, list(done.tool_calls))
            choice = whole_choice(kind, body, shaper.finish_reason(done.finish_reason))
            return {
                **head,
                "object": kind.object,
                "choices": [choice],
                "usage": _usage(done.usage),
            }
        writer = ChunkWriter(head, kind, req.include_usage)

        async def body() -> AsyncIterator[bytes]:
            delta, opening = first, True
            chars = 0
            drain = self.drain
            try:
                while True:
                    chars += len(delta.text)
                    notes["chars"] = chars
                    if delta.usage is not None:
                        notes["usage_so_far"] = delta.usage
                    elif delta.token_ids:  # an engine that reports usage only at the end
                        notes["tokens_sent"] = notes.get("tokens_sent", 0) + len(delta.token_ids)
                    for choice in chunk_choices(kind, shaper, delta, opening):
                        opening = False
                        yield writer.chunk(choice)
                    if delta.finish_reason is not None:
                        notes["usage"] = _usage(delta.usage)
                        break
                    if drain.expired:
                        raise ServiceUnavailable(
                            "the server is shutting down; this stream was ended early",
                            code="shutting_down",
                        )
                    delta = await anext(stream)
                if req.include_usage:
                    yield writer.usage(_usage(delta.usage))
            except LlmhostError as exc:
                # The status line is gone already; the error travels in-band as OpenAI does.
                log.warning("stream %s failed: %s", gen.request_id, exc.message)
                notes["status"] = exc.status_code
                yield sse(exc.to_openai())
            finally:
                await stream.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def completion(
        self, req: CompletionRequest, request_id: str, notes: dict[str, Any] | None = None
    ):
        model = self.check_model(req.model)
        gen = GenerationRequest(
            prompt=req.prompt,
            sampling=self.sampling(req, req.max_tokens),
            request_id=request_id,
            cache_prompt=req.cache_prompt,
        )
        return await self._respond(req, gen, model, COMPLETION, {} if notes is None else notes)

    async def chat(
        self, req: ChatCompletionRequest, request_id: str, notes: dict[str, Any] | None = None
    ):
        model = self.check_model(req.model)
        await check_schemas(req)
        plan = plan_chat(req, self.engine, self.tool_parser)
        sampling = self.sampling(req, req.token_budget)
        if plan.constraint is not None:
            sampling = replace(sampling, constraint=plan.constraint)
        gen = GenerationRequest(
            prompt=plan.prompt,
            sampling=sampling,
            request_id=request_id,
            messages=plan.messages,
            forward=plan.forward,
            cache_prompt=req.cache_prompt,
        )
        notes = {} if notes is None else notes
        try:
            return await self._respond(
                req,
                gen,
                model,
                CHAT,
                notes,
                ChatShaper(plan.parser(), forced=plan.forced is not None),
            )
        except InvalidRequest as exc:
            # A forced call's grammar is built from the tools' schemas: name those.
            if plan.forced is not None and exc.param == "response_format":
                exc.param = "tools"
            raise

    # --- /generate ---------------------------------------------------------------------------

    async def generate(
        self, req: GenerateRequest, request_id: str, notes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        notes = {} if notes is None else notes
        notes.update(model=self.model_id, prompt=req.prompt)
        if req.max_new_tokens is not None:
            budget = req.max_new_tokens
        else:
            n_prompt = len(self.engine.tokenize(req.prompt))
            budget = req.max_length - n_prompt
            if budget < 1:
                raise ContextLengthExceeded(
                    f"max_length {req.max_length} counts prompt and output tokens; the prompt "
                    f"alone has {n_prompt}. Raise max_length or use max_new_tokens.",
                    param="max_length",
                )
        sampling = SamplingParams(
            max_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed
        )
        first, stream = await self._start(
            GenerationRequest(prompt=req.prompt, sampling=sampling, request_id=request_id),
            self.model_id,
        )
        done = await self._collect(first, stream, notes)
        notes.update(usage=_usage(done.usage), chars=len(done.text))
        return {"text": done.text, "finish_reason": done.finish_reason, "usage": _usage(done.usage)}


def new_request_id() -> str:
    return uuid.uuid4().hex
