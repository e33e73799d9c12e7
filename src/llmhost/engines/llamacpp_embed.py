"""Embeddings from a GGUF model through llama.cpp: a context in embeddings mode with the
model's own pooling (mean where the model declares none, as for a decoder LLM), and one thread
that packs the inputs of every waiting request into as few decode calls as fit (`parallel`
sequences, `batch_size` tokens each), so concurrent requests are embedded together. Vectors
are L2-normalised, as llama-server returns them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as C
import numpy as np

from llmhost.engines.llamacpp import LlamaCppEngine
from llmhost.engines.llamacpp_threads import ThreadPool
from llmhost.errors import ContextLengthExceeded, EngineNotReady, InvalidRequest, ModelLoadError
from llmhost.types import ModelInfo

log = logging.getLogger("llmhost.engines.llamacpp")
POOLING = {
    C.LLAMA_POOLING_TYPE_MEAN: "mean",
    C.LLAMA_POOLING_TYPE_CLS: "cls",
    C.LLAMA_POOLING_TYPE_LAST: "last",
    C.LLAMA_POOLING_TYPE_RANK: "rank",
}


@dataclass(eq=False)
class _Job:
    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: list[np.ndarray | None] = field(default_factory=list)
    next: int = 0  # the next input to embed


class LlamaCppEmbeddingEngine(LlamaCppEngine):
    """A GGUF model served for `/v1/embeddings`."""

    kind = "embedding"

    def _load(self, path: Path) -> None:
        model = self._load_model(path)
        n_train = C.llama_model_n_ctx_train(model)
        per_seq = min(self.ctx_size or n_train, self.batch_size)
        ctx = self._context(model, per_seq, C.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if C.llama_pooling_type(ctx) == C.LLAMA_POOLING_TYPE_NONE:
            C.llama_free(ctx)  # a decoder LLM declares no pooling: mean, as llama-server's
            ctx = self._context(model, per_seq, C.LLAMA_POOLING_TYPE_MEAN)
        self.pooling = POOLING.get(C.llama_pooling_type(ctx), "mean")
        self._ctx = ctx
        self._threadpool = ThreadPool(ctx, self.threads)
        self._n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.dimensions = C.llama_model_n_embd(model)
        self.model_info = ModelInfo(id=self._model_id, context_length=per_seq)
        self._encoder = C.llama_model_has_encoder(model) and not C.llama_model_has_decoder(model)
        self._batch = C.llama_batch_init(self.batch_size, 0, self.parallel)
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="llamacpp-embed", daemon=True)
        self._thread.start()
        log.info(
            "loaded %s for embeddings: %d dimensions, %s pooling, %d tokens per input, "
            "%d inputs per batch",
            self.path.name,
            self.dimensions,
            self.pooling,
            per_seq,
            self.parallel,
        )

    def _context(self, model, per_seq: int, pooling: int):
        cparams = C.llama_context_default_params()
        cparams.n_ctx = per_seq * self.parallel
        cparams.n_seq_max = self.parallel
        cparams.n_batch = self.batch_size
        cparams.n_ubatch = self.batch_size  # an input is encoded in one ubatch
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.kv_unified = True
        cparams.no_perf = True
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create an embeddings context for {model}")
        return ctx

    async def close(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            with self._cond:
                self._running = False
                self._cond.notify()
            await asyncio.to_thread(thread.join)
            self._thread = None
            C.llama_batch_free(self._batch)
            for job in self._jobs:
                job.loop.call_soon_threadsafe(_fail, job.future, "the engine was shut down")
            self._jobs.clear()
        await super().close()

    def health(self):
        from llmhost.types import EngineHealth

        alive = getattr(self, "_thread", None) is not None and self._thread.is_alive()
        return EngineHealth(ok=alive, detail="" if alive else "not loaded", stats={})

    # --- requests -------------------------------------------------------------------------

    async def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One unit vector per input (token ids), in order."""
        if getattr(self, "_thread", None) is None:
            raise EngineNotReady("the model is not loaded", retry_after=5)
        limit = self.model_info.context_length
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequest(f"input[{i}] is empty", param="input")
            if len(ids) > limit:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(ids)} tokens; this model embeds at most {limit}",
                    param="input",
                )
            bad = next((t for t in ids if not 0 <= t < self._n_vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"token id {bad} in input[{i}] is outside the vocabulary", param="input"
                )
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop, loop.create_future(), [None] * len(inputs))
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        return await job.future

    # --- the thread -------------------------------------------------------------------------

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
            except Exception as exc:  # the jobs in this batch fail; the thread goes on
                log.exception("embedding batch failed")
                for job, _, _ in taken:
                    job.loop.call_soon_threadsafe(_fail, job.future, f"embedding failed: {exc}")
                with self._cond:
                    for job, _, _ in taken:
                        with contextlib.suppress(ValueError):
                            self._jobs.remove(job)

    def _take(self) -> list[tuple[_Job, int, list[int]]]:
        """Inputs of the waiting jobs, oldest first, that fit one batch (lock held)."""
        out: list[tuple[_Job, int, list[int]]] = []
        tokens = 0
        for job in self._jobs:
            while job.next < len(job.inputs) and len(out) < self.parallel:
                ids = job.inputs[job.next]
                if out and tokens + len(ids) > self.batch_size:
                    return out
                out.append((job, job.next, ids))
                tokens += len(ids)
                job.next += 1
            if len(out) >= self.parallel:
                break
        return out

    def _run(self, taken: list[tuple[_Job, int, list[int]]]) -> None:
        batch, ctx = self._batch, self._ctx
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        n = 0
        for seq, (_, _, ids) in enumerate(taken):
            for pos, token in enumerate(ids):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        rc = C.llama_encode(ctx, batch) if self._encoder else C.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama.cpp returned {rc}")
        size = self.dimensions
        done: list[_Job] = []
        for seq, (job, index, _) in enumerate(taken):
            ptr = C.llama_get_embeddings_seq(ctx, seq)
            vec = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (size,))
            vec = vec.astype(np.float32, copy=True)
            norm = float(np.linalg.norm(vec))
            job.vectors[index] = vec / norm if norm > 0 else vec
            if job.next == len(job.inputs) and all(v is not None for v in job.vectors):
                done.append(job)
        with self._cond:
            for job in done:
                self._jobs.remove(job)
        for job in done:
            job.loop.call_soon_threadsafe(_resolve, job.future, job.vectors)


def _resolve(future: asyncio.Future, vectors: list) -> None:
    if not future.done():
        future.set_result(vectors)


def _fail(future: asyncio.Future, why: str) -> None:
    if not future.done():
        from llmhost.errors import EngineError

        future.set_exception(EngineError(why))
