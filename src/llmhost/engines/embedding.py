"""What every in-process embedding engine shares: a thread that packs the inputs of every
waiting request, oldest first, into batches of at most `rows` inputs and `tokens` tokens, runs
the model once per batch (`EmbedLoop.vectors`), and hands each request its vectors when the
last of its inputs is done. Concurrent requests are thereby embedded together."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llmhost.engines.base import check_token_ids
from llmhost.errors import ContextLengthExceeded, EngineError, EngineNotReady, InvalidRequest
from llmhost.types import EngineHealth, ModelInfo


@dataclass(eq=False)
class _Job:
    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[np.ndarray]]
    vectors: list[np.ndarray | None] = field(default_factory=list)
    next: int = 0  # the next input to take


def check_inputs(inputs: list[list[int]], limit: int, n_vocab: int) -> None:
    """Each input is non-empty, within `limit` tokens and the vocabulary (400s naming it)."""
    for i, ids in enumerate(inputs):
        if not ids:
            raise InvalidRequest(f"input[{i}] is empty", param="input")
        if len(ids) > limit:
            raise ContextLengthExceeded(
                f"input[{i}] has {len(ids)} tokens; this model embeds at most {limit}",
                param="input",
            )
        check_token_ids(ids, n_vocab, "input", f" in input[{i}]")


THREAD_CHARS = 8192  # more text than this is tokenized in a worker thread


def truncated(ids: list[int], keep: int, suffix: list[int]) -> list[int]:
    """The first `keep` tokens of `ids`; where `ids` ends with the model's closing special
    tokens (BERT's [SEP]), those stay at the end."""
    if len(ids) <= keep:
        return ids
    tail = suffix if suffix and len(suffix) < keep and ids[-len(suffix) :] == suffix else []
    return ids[: keep - len(tail)] + tail


def unit(vec: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


class EmbedLoop(abc.ABC):
    """The batching thread; subclasses implement `vectors` (one batch through the model)."""

    def __init__(self, *, rows: int, tokens: int, normalize: bool, log: logging.Logger):
        self.rows, self.tokens, self.normalize, self.log = rows, tokens, normalize, log
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="embed-batch", daemon=True)
        self._thread.start()

    @abc.abstractmethod
    def vectors(self, batch: list[list[int]]) -> list[np.ndarray]:
        """The pooled vector of each input of one batch (runs on the loop's thread)."""

    def alive(self) -> bool:
        return self._thread.is_alive()

    async def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop, loop.create_future(), [None] * len(inputs))
        with self._cond:
            if not self._running:
                raise EngineError("the engine was shut down")
            self._jobs.append(job)
            self._cond.notify()
        return await job.future

    def close(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join()
        for job in self._jobs:
            job.loop.call_soon_threadsafe(_fail, job.future, "the engine was shut down")
        self._jobs.clear()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._jobs:
                    self._cond.wait()
                if not self._running:
                    return
                taken = self._take()
            if not taken:
                continue
            try:
                self._run(taken)
            except Exception as exc:  # this batch's requests fail; the thread goes on
                self.log.exception("embedding batch failed")
                failed = {id(job): job for job, _ in taken}.values()
                with self._cond:
                    for job in failed:
                        with contextlib.suppress(ValueError):
                            self._jobs.remove(job)
                for job in failed:
                    job.loop.call_soon_threadsafe(_fail, job.future, f"embedding failed: {exc}")

    def _take(self) -> list[tuple[_Job, int]]:
        """Inputs of the waiting jobs, oldest first, that fit one batch (lock held)."""
        out: list[tuple[_Job, int]] = []
        tokens = 0
        for job in self._jobs:
            while job.next < len(job.inputs) and len(out) < self.rows:
                n = len(job.inputs[job.next])
                if out and tokens + n > self.tokens:
                    return out
                out.append((job, job.next))
                tokens += n
                job.next += 1
            if len(out) >= self.rows:
                break
        return out

    def _run(self, taken: list[tuple[_Job, int]]) -> None:
        vecs = self.vectors([job.inputs[i] for job, i in taken])
        done = []
        for (job, i), vec in zip(taken, vecs, strict=True):
            vec = np.asarray(vec, dtype=np.float32)
            job.vectors[i] = unit(vec) if self.normalize else vec
            if job.next == len(job.inputs) and all(v is not None for v in job.vectors):
                done.append(job)
        with self._cond:
            for job in done:
                self._jobs.remove(job)
        for job in done:
            job.loop.call_soon_threadsafe(_resolve, job.future, job.vectors)


class EmbeddingEngine:
    """What an embedding engine adds to the engine it is built on (mixed in first): the
    batching loop its load sets up, health from that loop, `embed` and closing the loop."""

    kind = "embedding"
    supports_logprobs = False
    supports_logit_bias = False
    _loop: EmbedLoop | None = None
    _n_vocab: int = 0
    _suffix: list[int] | None = None
    model_info: ModelInfo

    if TYPE_CHECKING:  # the engine it is mixed into tokenizes

        def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    def special_suffix(self) -> list[int]:
        """The special tokens tokenizing appends to any text (BERT: [SEP]; none for most
        decoders): what the two shortest texts end with in common."""
        if self._suffix is None:
            a, b = self.tokenize("a"), self.tokenize("b")
            n = 0
            while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
                n += 1
            self._suffix = a[len(a) - n :]
        return self._suffix

    def truncate(self, inputs: list[list[int]], keep: int | None) -> list[list[int]]:
        """Each input cut to `keep` tokens (-1: the model's limit), closing special tokens
        kept; `None` leaves them as they are (and one too long is then a 400)."""
        if keep is None:
            return inputs
        limit = self.model_info.context_length
        if keep == -1:
            keep = limit
        if keep > limit:
            raise InvalidRequest(
                f"truncate_prompt_tokens is {keep}; this model takes at most {limit}",
                param="truncate_prompt_tokens",
            )
        suffix = self.special_suffix()
        return [truncated(ids, keep, suffix) for ids in inputs]

    def health(self) -> EngineHealth:
        alive = self._loop is not None and self._loop.alive()
        return EngineHealth(ok=alive, detail="" if alive else "not loaded")

    async def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One vector per input (token ids), in order."""
        if self._loop is None:
            raise EngineNotReady("the model is not loaded", retry_after=5)
        check_inputs(inputs, self.model_info.context_length, self._n_vocab)
        return await self._loop.embed(inputs)

    async def close(self) -> None:
        if self._loop is not None:
            await asyncio.to_thread(self._loop.close)
            self._loop = None
        await super().close()  # type: ignore[misc]


class RerankEngine(EmbeddingEngine):
    """A cross-encoder: each (query, document) pair through the model's classification head
    in the shared batches; its relevance is the sigmoid of the first logit. Engines build
    their model's pair encoding (`pair`)."""

    kind = "rerank"

    def pair(self, query: str, document: str) -> list[int]:
        raise NotImplementedError

    async def rerank(
        self, query: str, documents: list[str], truncate: int | None = None
    ) -> tuple[list[float], int]:
        """Relevance of each document to `query` (0..1), and the tokens scored. With
        `truncate`, each pair is cut to that many tokens (the query comes first, so the
        document is what is cut)."""
        if self._loop is None:
            raise EngineNotReady("the model is not loaded", retry_after=5)

        def encode() -> list[list[int]]:
            return self.truncate([self.pair(query, d) for d in documents], truncate)

        chars = len(query) * len(documents) + sum(len(d) for d in documents)
        pairs = await asyncio.to_thread(encode) if chars > THREAD_CHARS else encode()
        limit = self.model_info.context_length
        for i, ids in enumerate(pairs):
            if len(ids) > limit:
                raise ContextLengthExceeded(
                    f"the query with documents[{i}] is {len(ids)} tokens; this model scores "
                    f"at most {limit}",
                    param="documents",
                )
        logits = await self._loop.embed(pairs)
        scores = [float(1.0 / (1.0 + np.exp(-float(v[0])))) for v in logits]
        return scores, sum(len(p) for p in pairs)


def _resolve(future: asyncio.Future[list[np.ndarray]], vectors: list[np.ndarray | None]) -> None:
    if not future.done():  # every vector is there by now
        future.set_result([v for v in vectors if v is not None])


def _fail(future: asyncio.Future[list[np.ndarray]], why: str) -> None:
    if not future.done():
        future.set_exception(EngineError(why))
