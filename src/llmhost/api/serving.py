"""Request logic behind the OpenAI routes: resolve the model, render the prompt, run the engine,
and shape the result as a JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi.responses import StreamingResponse

from llmhost.api.choices import Choice, Choices, chunk_body, total_usage, whole_body
from llmhost.api.logprobs import LogprobShaper
from llmhost.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _SamplingRequest,
)
from llmhost.api.record import RequestRecord
from llmhost.api.serving_chat import (
    ChatPlan,
    ChatShaper,
    check_schemas,
    gather_remote_calls,
    plan_chat,
)
from llmhost.api.sse import (
    CHAT,
    COMPLETION,
    SSE_HEADERS,
    ChunkWriter,
    Kind,
    sse,
    usage_body,
)
from llmhost.engines.base import Engine, TokenStream
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
# Prompt groups of one request run at most this many at a time on an engine without a fixed
# number of sequences (a remote server)
REMOTE_WIDTH = 16


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
        inner: TokenStream,
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
    def sampling(
        req: _SamplingRequest, max_tokens: int | None, logprobs: int | None = None
    ) -> SamplingParams:
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
            logit_bias=req.bias,
            logprobs=logprobs,
        )

    def _check_features(self, req: _SamplingRequest, logprobs: bool) -> None:
        """What the request asks of the engine beyond text, refused by name where it lacks it."""
        engine = self.engine
        if logprobs and not engine.supports_logprobs:
            raise InvalidRequest(
                f"logprobs are not supported by this model's engine ({engine.name})",
                param="logprobs",
            )
        if req.logit_bias and not engine.supports_logit_bias:
            raise InvalidRequest(
                f"logit_bias is not supported by this model's engine ({engine.name})",
                param="logit_bias",
            )
        limit = engine.max_sequences
        if limit is not None and req.n > limit:
            raise InvalidRequest(
                f"n is {req.n}, but this server runs at most {limit} sequences at once (its "
                f"parallel setting) and a request's choices run together; ask for n <= {limit}",
                param="n",
            )

    async def _start(self, gen: GenerationRequest, model: str) -> tuple[TokenDelta, TokenStream]:
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
    async def _collect(first: TokenDelta, stream: TokenStream, record: RequestRecord) -> TokenDelta:
        parts = [first.text]
        calls: dict[int, dict[str, Any]] = {}
        gather_remote_calls(calls, first.tool_calls)
        last = first
        record.usage_so_far = first.usage
        try:
            while last.finish_reason is None:
                last = await anext(stream)
                parts.append(last.text)
                gather_remote_calls(calls, last.tool_calls)
                if last.usage is not None:
                    record.usage_so_far = last.usage
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
        choices: list[Choice],
        model: str,
        kind: Kind,
        record: RequestRecord,
    ) -> dict[str, Any] | StreamingResponse:
        """Run the choices and answer as one JSON body, or as SSE chunks when `req.stream`.
        What the audit log needs (model, prompt, usage, length of the text) is left in
        `record`."""
        record.stream = bool(req.stream)
        limit = self.engine.max_sequences or REMOTE_WIDTH
        run = Choices(choices, lambda g: self._start(g, model), limit // req.n)
        await run.open()
        head = {
            "id": f"{kind.id_prefix}-{choices[0].gen.request_id}",
            "created": int(time.time()),
            "model": model,
        }
        if not req.stream:
            try:
                return await whole_body(run, kind, head, record)
            finally:
                await run.aclose()
        writer = ChunkWriter(head, kind, req.include_usage)
        one = len(choices) == 1

        async def body() -> AsyncIterator[bytes]:
            drain = self.drain
            chars = 0
            try:
                async for c, delta in run.deltas():
                    chars += len(delta.text)
                    record.chars = chars
                    record.usage_so_far = c.usage if one else total_usage(run.all)
                    for choice in chunk_body(kind, c, delta):
                        yield writer.chunk(choice)
                    if delta.finish_reason is None and drain.expired:
                        raise ServiceUnavailable(
                            "the server is shutting down; this stream was ended early",
                            code="shutting_down",
                        )
                record.usage = total_usage(run.all)
                if req.include_usage:
                    yield writer.usage(usage_body(record.usage))
            except LlmhostError as exc:
                # The status line is gone already; the error travels in-band as OpenAI does.
                log.warning("stream %s failed: %s", head["id"], exc.message)
                record.error_status = exc.status_code
                yield sse(exc.to_openai())
            finally:
                await run.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    def _new_choices(
        self,
        req: _SamplingRequest,
        prompts: list[Any],
        gen: GenerationRequest,
        logprobs: bool,
        shaper: Callable[[], Any],
    ) -> list[Choice]:
        """n choices per prompt, in OpenAI's order; choice j of a prompt is seeded with
        seed + j, so it equals a request for that prompt alone with that seed."""
        out: list[Choice] = []
        seed = gen.sampling.seed
        for g, prompt in enumerate(prompts):
            for j in range(req.n):
                sampling = gen.sampling
                if seed is not None and j:
                    sampling = replace(sampling, seed=(seed + j) % 2**64)
                lp = None
                if logprobs:
                    lp = LogprobShaper(self.engine.token_bytes, chat=gen.messages is not None)
                out.append(
                    Choice(
                        index=len(out),
                        group=g,
                        gen=replace(gen, prompt=prompt, sampling=sampling),
                        shaper=shaper(),
                        logprobs=lp,
                    )
                )
        return out

    def _echo(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if not self.engine.supports_logprobs:
            raise InvalidRequest(
                f"echo of a token-id prompt is not supported by this model's engine "
                f"({self.engine.name})",
                param="echo",
            )
        data = b"".join(self.engine.token_bytes(t) for t in prompt)
        return data.decode("utf-8", errors="replace")

    async def completion(
        self, req: CompletionRequest, request_id: str, record: RequestRecord | None = None
    ) -> dict[str, Any] | StreamingResponse:
        model = self.check_model(req.model)
        record = RequestRecord() if record is None else record
        record.model, record.prompt = model, req.prompt
        wants = req.logprobs is not None
        self._check_features(req, wants)
        sampling = self.sampling(req, req.max_tokens, req.logprobs)
        if req.echo and wants:
            sampling = replace(sampling, prompt_logprobs=req.logprobs)
        gen = GenerationRequest(
            prompt="", sampling=sampling, request_id=request_id, cache_prompt=req.cache_prompt
        )
        prompts = req.prompts
        choices = self._new_choices(req, prompts, gen, wants, _TextShaper)
        if req.echo:
            for c in choices:
                c.echo = self._echo(prompts[c.group])
        return await self._respond(req, choices, model, COMPLETION, record)

    async def chat_request(
        self, req: ChatCompletionRequest, request_id: str, logprobs: int | None = None
    ) -> tuple[ChatPlan, GenerationRequest]:
        """How a chat request runs (checked against the engine) and its engine request."""
        await check_schemas(req)
        plan = plan_chat(req, self.engine, self.tool_parser)
        sampling = self.sampling(req, req.token_budget, logprobs)
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
        return plan, gen

    async def chat(
        self, req: ChatCompletionRequest, request_id: str, record: RequestRecord | None = None
    ) -> dict[str, Any] | StreamingResponse:
        model = self.check_model(req.model)
        record = RequestRecord() if record is None else record
        self._check_features(req, req.logprobs)
        top = (req.top_logprobs or 0) if req.logprobs else None
        plan, gen = await self.chat_request(req, request_id, top)
        record.model, record.prompt = model, plan.prompt
        choices = self._new_choices(
            req,
            [plan.prompt],
            gen,
            req.logprobs,
            lambda: ChatShaper(plan.parser(), forced=plan.forced is not None),
        )
        try:
            return await self._respond(req, choices, model, CHAT, record)
        except InvalidRequest as exc:
            # A forced call's grammar is built from the tools' schemas: name those.
            if plan.forced is not None and exc.param == "response_format":
                exc.param = "tools"
            raise

    # --- /generate ---------------------------------------------------------------------------

    async def generate(
        self, req: GenerateRequest, request_id: str, record: RequestRecord | None = None
    ) -> dict[str, Any]:
        record = RequestRecord() if record is None else record
        record.model, record.prompt = self.model_id, req.prompt
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
        done = await self._collect(first, stream, record)
        record.usage, record.chars = done.usage or Usage(0, 0), len(done.text)
        return {
            "text": done.text,
            "finish_reason": done.finish_reason,
            "usage": usage_body(done.usage),
        }
