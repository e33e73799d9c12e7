"""Continuous batching over llama.cpp's C API: one thread owns the llama_context and decodes
every active sequence in one `llama_decode` per step.

Each step: drop cancelled sequences (their KV cells are freed with `llama_memory_seq_rm`), admit
waiting requests into free sequence slots, then fill one batch with the next token of every
decoding sequence plus as much pending prompt as the batch has room for (chunked prefill, so a
long prompt never stalls running streams for more than one step), decode, and sample each
sequence that produced logits with its own sampler chain. Results go back to the asyncio loop
with `call_soon_threadsafe`; the GIL is released inside every llama.cpp call.
"""

from __future__ import annotations

import codecs
import ctypes
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as C
import numpy as np

from llmhost.engines.batching import BaseSequence, BatchLoop

log = logging.getLogger("llmhost.engines.llamacpp")

PENALTY_LAST_N = 64


@dataclass(eq=False)
class Sequence(BaseSequence):
    """A request in a llama.cpp sequence slot, with its own sampler chain."""

    slot: int = -1
    sampler: Any = None
    decoder: Any = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


class BatchScheduler(BatchLoop):
    """Owns the llama.cpp context; all llama_decode calls happen on its thread."""

    thread_name = "llamacpp-batch"

    def __init__(
        self,
        ctx: Any,
        vocab: Any,
        n_vocab: int,
        eog_tokens: list[int],
        *,
        n_slots: int,
        batch_size: int,
        max_queue: int,
    ):
        super().__init__(n_slots=n_slots, max_queue=max_queue, log=log)
        self.ctx = ctx
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.batch_size = batch_size
        self._eog = set(eog_tokens)
        self._eog_bias = (C.llama_logit_bias * len(eog_tokens))(
            *[C.llama_logit_bias(token=t, bias=float("-inf")) for t in eog_tokens]
        )
        self._mem = C.llama_get_memory(ctx)
        self._batch = C.llama_batch_init(batch_size, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._free_slots = list(range(n_slots))  # a min-heap: lowest slot first
        self.start()

    def _shutdown(self) -> None:
        C.llama_batch_free(self._batch)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.sampler = self._make_sampler(seq)
            self._active.append(seq)

    def _make_sampler(self, seq: Sequence) -> Any:
        sp = seq.sampling
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = C.llama_sampler_chain_add
        if sp.ignore_eos and self._eog:
            add(
                chain, C.llama_sampler_init_logit_bias(self.n_vocab, len(self._eog), self._eog_bias)
            )
        penalised = (
            sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0
        )
        if penalised:
            add(
                chain,
                C.llama_sampler_init_penalties(
                    self.n_vocab,
                    PENALTY_LAST_N,
                    sp.repeat_penalty,
                    sp.frequency_penalty,
                    sp.presence_penalty,
                ),
            )
        if sp.temperature <= 0.0:
            add(chain, C.llama_sampler_init_greedy())
        else:
            if sp.top_k > 0:
                add(chain, C.llama_sampler_init_top_k(sp.top_k))
            if sp.top_p < 1.0:
                add(chain, C.llama_sampler_init_top_p(sp.top_p, 1))
            if sp.min_p > 0.0:
                add(chain, C.llama_sampler_init_min_p(sp.min_p, 1))
            add(chain, C.llama_sampler_init_temp(sp.temperature))
            seed = C.LLAMA_DEFAULT_SEED if sp.seed is None else sp.seed & 0xFFFFFFFF
            add(chain, C.llama_sampler_init_dist(seed))
        if penalised:
            for tok in seq.prompt[-PENALTY_LAST_N:]:
                C.llama_sampler_accept(chain, tok)
        return chain

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            C.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        if seq.sampler is not None:
            C.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def _step(self) -> None:
        # Room first for every decoding sequence (one token each), then prompt chunks in
        # admission order. Tokens are then laid out by slot: with one KV stream per sequence,
        # llama.cpp batches together only runs of consecutive sequence ids, so the batch
        # must list slots in order (and slots are handed out lowest first to keep them dense).
        room = self.batch_size - sum(1 for s in self._active if not s.prefilling)
        plan: dict[int, int] = {}
        for seq in self._active:
            if seq.prefilling:
                take = min(len(seq.prompt) - seq.n_fed, max(room, 0))
                room -= take
                if take:
                    plan[seq.slot] = take
        batch = self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        for seq in sorted(self._active, key=lambda s: s.slot):
            if not seq.prefilling:
                pos = len(seq.prompt) + seq.n_generated - 1
                self._put(n, seq.last_token, pos, seq.slot, True)
                outputs.append((seq, n))
                n += 1
                continue
            take = plan.get(seq.slot, 0)
            for j in range(take):
                pos = seq.n_fed + j
                last = pos == len(seq.prompt) - 1
                self._put(n, seq.prompt[pos], pos, seq.slot, last)
                if last:
                    outputs.append((seq, n))
                n += 1
            seq.n_fed += take
        batch.n_tokens = n
        # Hand over the previous step's tokens now: the event loop formats and sends them
        # while llama_decode runs without the GIL, instead of contending with sampling.
        self._flush()
        rc = C.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        self.steps += 1
        for seq, idx in outputs:
            self._sample(seq, idx)

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = slot
        b.logits[i] = logits

    def _sample(self, seq: Sequence, idx: int) -> None:
        if seq.cancelled:
            return
        if seq.grammar is not None:
            # Masked in place in llama.cpp's logits: the sampler chain (penalties,
            # temperature, greedy) then sees only the tokens the grammar allows.
            logits = C.llama_get_logits_ith(self.ctx, idx)
            seq.grammar.mask_logits(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        token = C.llama_sampler_sample(seq.sampler, self.ctx, idx)
        self._emit(seq, token, token in self._eog)

    def _take(self, seq: Sequence, token: int) -> str:
        n = C.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return seq.decoder.decode(self._piece.raw[:n] if n > 0 else b"")

    def _tail(self, seq: Sequence) -> str:
        return seq.stops.flush() + seq.decoder.decode(b"", final=True)
