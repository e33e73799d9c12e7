"""What every in-process batching engine shares: one thread owns the model and runs steps over
all active sequences, requests queue up in between, results return to the asyncio loop in one
wake-up per step. Engines subclass `BatchLoop` and implement admission, the step and release.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from llmhost.engines.base import Engine, StopMatcher, check_context, check_token_ids
from llmhost.errors import EngineError, EngineNotReady, InvalidRequest, Overloaded
from llmhost.store import crypto
from llmhost.types import (
    Constraint,
    EngineHealth,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    Usage,
)

if TYPE_CHECKING:
    from llmhost.config import Settings
    from llmhost.engines.grammar import GrammarCompiler, Matcher

THREAD_TOKENIZE_CHARS = 8192  # longer prompts are tokenized in a thread
BURST_QUIET = 0.004  # seconds without a new arrival that end a burst
BURST_MAX_WAIT = 0.025  # the longest a burst may delay the first prefill


@dataclass(eq=False)
class BaseSequence:
    """One request inside a scheduler; its results go to `queue`, owned by `loop`."""

    prompt: list[int]
    sampling: SamplingParams
    budget: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenDelta | BaseException]
    n_fed: int = 0  # prompt tokens already in the KV cache
    n_generated: int = 0
    last_token: int = -1
    cancelled: bool = False
    grammar: Matcher | None = None  # the constraint on its output, if any
    cache_prompt: bool = True  # False: reuse no cached prefix and keep nothing afterwards
    stops: StopMatcher = field(init=False)
    # The prompt's log-probabilities as they are computed; sent with the first delta
    prompt_lps: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.sampling.stop)

    @property
    def prefilling(self) -> bool:
        return self.n_fed < len(self.prompt)


_Delivery = tuple["asyncio.Queue[TokenDelta | BaseException]", "TokenDelta | BaseException"]

# The sequence class an engine's loop schedules: its hooks see that class's own fields.
SeqT = TypeVar("SeqT", bound=BaseSequence)


def _deliver(items: list[_Delivery]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class BatchLoop(abc.ABC, Generic[SeqT]):
    """The scheduler thread and its queues. Subclasses own the model state and implement
    `_admit` (move waiting sequences into the batch), `_step` (one forward pass over the
    active ones), `_release` (free what a sequence held) and `_shutdown` (free the rest)."""

    thread_name = "engine-batch"

    def __init__(self, *, n_slots: int, max_queue: int, log: logging.Logger):
        self.n_slots = n_slots
        self.max_queue = max_queue
        self.log = log
        self._cond = threading.Condition()
        self._waiting: deque[SeqT] = deque()
        self._active: list[SeqT] = []
        self._running = True
        self._outbox: list[tuple[SeqT, TokenDelta | BaseException]] = []
        self.steps = 0
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- called from the event loop -------------------------------------------------------

    def free_slots(self) -> int:
        return self.n_slots - len(self._active)

    def submit(self, seq: SeqT) -> bool:
        """Queue a sequence; False when the wait queue is full."""
        with self._cond:
            if not self._running:
                return False
            if len(self._waiting) >= self.free_slots() + self.max_queue:
                return False
            self._waiting.append(seq)
            self._cond.notify()
        return True

    def cancel(self, seq: SeqT) -> None:
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {
                "running": len(self._active),
                "waiting": len(self._waiting),
                "slots": self.n_slots,
                "steps": self.steps,
                "kv_tokens": sum(s.n_fed + s.n_generated for s in self._active),
                **self.prefix_stats(),
            }

    def prefix_stats(self) -> dict[str, float]:
        """Prefix-cache counters and gauges (see engines/base.py); none by default."""
        return {}

    def close(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._shutdown()

    async def run(self, seq: SeqT, busy_message: str) -> AsyncIterator[TokenDelta]:
        """Submit `seq` and yield its deltas; cancels it if the consumer stops early."""
        if not self.submit(seq):
            raise Overloaded(busy_message, retry_after=1)
        finished = False
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineError(f"generation failed: {item}") from item
                if item.finish_reason is not None:
                    finished = True
                    yield item
                    return
                yield item
        finally:
            if not finished:  # the client went away: free the sequence now
                self.cancel(seq)

    # --- the scheduler thread -------------------------------------------------------------

    def _thread_context(self) -> contextlib.AbstractContextManager[object]:
        """Per-thread state around every step (torch's inference mode, for one)."""
        return contextlib.nullcontext()

    def _main(self) -> None:
        try:
            with self._thread_context():
                self._serve()
        except Exception as exc:  # a failed step must not leave clients hanging
            self.log.exception("batch scheduler stopped")
            with self._cond:
                self._running = False
            self._fail_all(exc)
            return
        self._fail_all(None)

    def _idle(self) -> None:
        """Called when the batch has emptied, before the thread waits for work."""

    def _serve(self) -> None:
        while True:
            if not self._active:
                self._flush()
                self._idle()
            with self._cond:
                while self._running and not self._active and not self._waiting:
                    self._cond.wait()
                if not self._running:
                    break
                if not self._active:
                    self._gather_burst()
                self._reap_cancelled()
                self._admit()
            if self._active:
                self._step()

    def _post(self, seq: SeqT, item: TokenDelta | BaseException) -> None:
        if seq.prompt_lps and isinstance(item, TokenDelta):
            item = replace(item, prompt_logprobs=tuple(seq.prompt_lps))
            seq.prompt_lps = []
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Deliver queued results with one wake-up per event loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(_deliver, items)

    def _gather_burst(self) -> None:
        """From idle, wait a moment for requests arriving together (a closed-loop client, a
        fan-out) so their prompts are prefilled in one step instead of trickling in one
        step behind each other. Nothing is decoding, so no stream is delayed."""
        deadline = time.monotonic() + BURST_MAX_WAIT
        while self._running and len(self._waiting) < self.free_slots():
            seen = len(self._waiting)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(BURST_QUIET, left))
            if len(self._waiting) == seen:
                return

    def _fail_all(self, exc: BaseException | None) -> None:
        with self._cond:
            seqs = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        for seq in seqs:
            self._release(seq)
            if not seq.cancelled:
                self._post(seq, exc or RuntimeError("the engine was shut down"))
        self._flush()

    def _reap_cancelled(self) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in self._active if s.cancelled]:
            self._finish(seq)

    def _finish(self, seq: SeqT) -> None:
        self._active.remove(seq)
        self._release(seq)

    # --- output: the same finish rules for every engine ---------------------------------------

    def _emit(
        self, seq: SeqT, token: int, is_eos: bool, logprob: TokenLogprob | None = None
    ) -> None:
        """A sampled token ends the stream at EOS (unless ignored), a stop string or the
        budget; otherwise its text goes out. A budget of 0 (a prompt scored, nothing
        generated) ends it before the token."""
        seq.last_token = token
        if seq.budget == 0:
            self._done(seq, "length", "")
            return
        if is_eos and not seq.sampling.ignore_eos:
            self._done(seq, "stop", self._tail(seq))
            return
        seq.n_generated += 1
        lps = () if logprob is None else (logprob,)
        text, hit = seq.stops.feed(self._take(seq, token))
        if hit:
            self._done(seq, "stop", text, (token,), lps)
        elif seq.grammar is not None and seq.grammar.advance(token):
            self._done(seq, "stop", text + self._tail(seq), (token,), lps)
        elif seq.n_generated >= seq.budget:
            self._done(seq, "length", text + self._tail(seq), (token,), lps)
        else:
            # Usage so far on every delta: a stream dropped midway is charged what it got.
            self._post(
                seq,
                TokenDelta(
                    text=text,
                    token_ids=(token,),
                    usage=Usage(len(seq.prompt), seq.n_generated),
                    logprobs=lps,
                ),
            )

    def _done(
        self,
        seq: SeqT,
        reason: FinishReason,
        text: str,
        ids: tuple[int, ...] = (),
        lps: tuple[TokenLogprob, ...] = (),
    ) -> None:
        with self._cond:
            self._finish(seq)
        self._post(
            seq,
            TokenDelta(
                text=text,
                token_ids=ids,
                finish_reason=reason,
                usage=Usage(len(seq.prompt), seq.n_generated),
                logprobs=lps,
            ),
        )

    @abc.abstractmethod
    def _take(self, seq: SeqT, token: int) -> str:
        """Record an accepted (non-EOS) token and return the text it completes."""

    @abc.abstractmethod
    def _tail(self, seq: SeqT) -> str:
        """Text still held back when the stream ends (an unfinished character, a possible
        stop string)."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Move waiting sequences into the batch while there is room (lock held)."""

    @abc.abstractmethod
    def _step(self) -> None:
        """One forward pass over the active sequences, posting what they produced."""

    @abc.abstractmethod
    def _release(self, seq: SeqT) -> None:
        """Free whatever `seq` holds; called once it leaves the batch."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Free the scheduler's own resources after the thread has stopped."""


def engine_settings(settings: Settings) -> dict[str, Any]:
    """The constructor arguments every in-process batched engine takes from the settings."""
    return {
        "model_id": settings.model_name,
        "threads": settings.threads,
        "ctx_size": settings.ctx_size,
        "parallel": settings.parallel,
        "batch_size": settings.batch_size,
        "max_queue": settings.max_queue,
        "key_loader": lambda: crypto.load_key(settings.model_key_file, settings.model_key_command),
        "decrypt_dir": settings.decrypt_dir,
        "decrypt_allow_disk": settings.decrypt_allow_disk,
        "prompt_cache": settings.prompt_cache,
        "prompt_cache_bytes": settings.prompt_cache_mb << 20,
    }


class BatchedEngine(Engine, Generic[SeqT]):
    """An engine whose generations run in a BatchLoop: prompt checks, streaming and health
    are the same for each. Subclasses set `sequence_type`, and `_scheduler` and `_n_vocab`
    once loaded."""

    sequence_type: type[SeqT]
    supports_logprobs = True
    supports_logit_bias = True
    _scheduler: BatchLoop[SeqT] | None = None
    _n_vocab: int = 0
    _grammars: GrammarCompiler | None = None

    # Read-only here where Engine declares a plain attribute (FakeEngine sets it).
    @property
    def max_sequences(self) -> int | None:  # type: ignore[override]
        return None if self._scheduler is None else self._scheduler.n_slots

    def health(self) -> EngineHealth:
        if self._scheduler is None:
            return EngineHealth(ok=False, detail="not loaded")
        alive = self._scheduler.alive()
        stats = self._scheduler.stats()
        cells = stats["slots"] * self.model_info.context_length
        stats["kv_cache_usage"] = stats["kv_tokens"] / cells if cells else 0.0
        return EngineHealth(ok=alive, detail="" if alive else "scheduler stopped", stats=stats)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        scheduler = self._scheduler
        if scheduler is None:
            raise EngineNotReady("the model is not loaded", retry_after=5)
        check_token_ids([t for t, _ in request.sampling.logit_bias], self._n_vocab, "logit_bias")
        if isinstance(request.prompt, list):
            prompt = list(request.prompt)
            check_token_ids(prompt, self._n_vocab, "prompt")
        elif len(request.prompt) > THREAD_TOKENIZE_CHARS:
            # The tokenizers release the GIL: a huge prompt never holds up the event loop.
            prompt = await asyncio.to_thread(self.tokenize, request.prompt, request.add_special)
        else:
            prompt = self.tokenize(request.prompt, request.add_special)
        budget = check_context(
            len(prompt), request.sampling.max_tokens, self.model_info.context_length
        )
        seq = self.sequence_type(
            prompt=prompt,
            sampling=request.sampling,
            budget=budget,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            grammar=await self._matcher(request.sampling.constraint),
            cache_prompt=request.cache_prompt,
        )
        busy = (
            f"all {scheduler.n_slots} sequences are busy and {scheduler.max_queue} requests "
            "are already waiting; retry shortly"
        )
        async for delta in scheduler.run(seq, busy):
            yield delta

    async def _matcher(self, constraint: Constraint | None) -> Matcher | None:
        """A fresh matcher for `constraint`; a grammar not compiled yet is compiled in a
        thread, so a bad one is an InvalidRequest before the first delta."""
        if constraint is None:
            return None
        compiler = self._grammars
        if compiler is None:
            raise InvalidRequest(
                f"the {self.name} engine cannot constrain its output", param="response_format"
            )
        grammar = compiler.cached(constraint)
        if grammar is None:
            grammar = await asyncio.to_thread(compiler.compile, constraint)
        return grammar.matcher()
