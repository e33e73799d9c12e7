"""Embeddings from a GGUF model through llama.cpp: a context in embeddings mode with the
model's own pooling (mean where the model declares none, as for a decoder LLM); the inputs of
concurrent requests are packed into shared decode calls (`parallel` sequences, `batch_size`
tokens each; see engines.embedding). Vectors are L2-normalised, as llama-server returns them."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np

from llmhost.engines.embedding import EmbeddingEngine, EmbedLoop, RerankEngine
from llmhost.engines.llamacpp import LlamaCppEngine
from llmhost.engines.llamacpp_threads import ThreadPool
from llmhost.errors import ModelLoadError
from llmhost.types import ModelInfo

log = logging.getLogger("llmhost.engines.llamacpp")
UBATCH = 512
POOLING = {
    C.LLAMA_POOLING_TYPE_MEAN: "mean",
    C.LLAMA_POOLING_TYPE_CLS: "cls",
    C.LLAMA_POOLING_TYPE_LAST: "last",
    C.LLAMA_POOLING_TYPE_RANK: "rank",
}


class _LlamaEmbedLoop(EmbedLoop):
    """Owns the embeddings context; every llama.cpp call on it happens on the loop's thread."""

    def __init__(
        self,
        ctx: Any,
        *,
        encoder: bool,
        dimensions: int,
        rows: int,
        tokens: int,
        normalize: bool = True,
    ):
        self.ctx, self.encoder, self.dimensions = ctx, encoder, dimensions
        self.batch = C.llama_batch_init(tokens, 0, rows)
        super().__init__(rows=rows, tokens=tokens, normalize=normalize, log=log)

    def vectors(self, inputs: list[list[int]]) -> list[np.ndarray]:
        batch, ctx = self.batch, self.ctx
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        n = 0
        for seq, ids in enumerate(inputs):
            for pos, token in enumerate(ids):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        rc = C.llama_encode(ctx, batch) if self.encoder else C.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama.cpp returned {rc}")
        out = []
        for seq in range(len(inputs)):
            ptr = ctypes.cast(C.llama_get_embeddings_seq(ctx, seq), ctypes.POINTER(ctypes.c_float))
            out.append(np.ctypeslib.as_array(ptr, (self.dimensions,)).copy())
        return out

    def close(self) -> None:
        super().close()
        C.llama_batch_free(self.batch)


class LlamaCppEmbeddingEngine(EmbeddingEngine, LlamaCppEngine):
    """A GGUF model served for `/v1/embeddings`."""

    pooling_type = C.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own

    def _load(self, path: Path) -> None:
        model = self._load_model(path)
        self._check_model(model)
        n_train = C.llama_model_n_ctx_train(model)
        per_seq = min(self.ctx_size or n_train, self.batch_size)
        ctx = self._context(model, per_seq, self.pooling_type)
        if C.llama_pooling_type(ctx) == C.LLAMA_POOLING_TYPE_NONE:
            C.llama_free(ctx)  # a decoder LLM declares no pooling: mean, as llama-server's
            ctx = self._context(model, per_seq, C.LLAMA_POOLING_TYPE_MEAN)
        self.pooling = POOLING.get(C.llama_pooling_type(ctx), "mean")
        self._ctx = ctx
        self._threadpool = ThreadPool(ctx, self.threads)
        self._n_vocab = C.llama_vocab_n_tokens(self._vocab)
        rank = self.pooling == "rank"
        self.dimensions = C.llama_model_n_cls_out(model) if rank else C.llama_model_n_embd(model)
        self.model_info = ModelInfo(id=self._model_id, context_length=per_seq)
        self._loop = _LlamaEmbedLoop(
            ctx,
            encoder=C.llama_model_has_encoder(model) and not C.llama_model_has_decoder(model),
            dimensions=self.dimensions,
            rows=self.parallel,
            tokens=self._ubatch(per_seq),  # an encoder takes one ubatch per call
            normalize=not rank,
        )
        log.info(
            "loaded %s for embeddings: %d dimensions, %s pooling, %d tokens per input, "
            "%d inputs per batch",
            self.path.name,
            self.dimensions,
            self.pooling,
            per_seq,
            self.parallel,
        )

    def _ubatch(self, per_seq: int) -> int:
        return min(self.batch_size, max(per_seq, UBATCH))

    def _check_model(self, model: Any) -> None:
        """Refuse a model this engine cannot serve (before a context is made)."""

    @staticmethod
    def _meta(model: Any, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _context(self, model: Any, per_seq: int, pooling: int) -> Any:
        cparams = C.llama_context_default_params()
        cparams.n_ctx = per_seq * self.parallel
        cparams.n_seq_max = self.parallel
        cparams.n_batch = self.batch_size
        # An input is encoded in one ubatch (an encoder takes a whole batch in one), and
        # attention spans the ubatch over the unified cache, masked per sequence: batches of
        # about 512 tokens, as llama-server's, keep that quadratic part small.
        cparams.n_ubatch = self._ubatch(per_seq)
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.kv_unified = True
        cparams.no_perf = True
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create an embeddings context for {self.path}"
            )
        return ctx


class LlamaCppRerankEngine(RerankEngine, LlamaCppEmbeddingEngine):
    """A GGUF cross-encoder (a rank head: `cls`, `cls.output`) served for `/v1/rerank`."""

    pooling_type = C.LLAMA_POOLING_TYPE_RANK

    def _check_model(self, model: Any) -> None:
        arch = self._meta(model, "general.architecture") or ""
        if self._meta(model, f"{arch}.pooling_type") != str(C.LLAMA_POOLING_TYPE_RANK):
            raise ModelLoadError(
                f"{self.path} is not a reranker: it declares no rank pooling (a "
                "classification head over the query and document)"
            )

    def pair(self, query: str, document: str) -> list[int]:
        """BERT's pair encoding: [CLS] query [SEP] document [SEP]."""
        sep = C.llama_vocab_sep(self._vocab)
        return self.tokenize(query, True) + self.tokenize(document, False) + [sep]
