"""Continuous batching over llama.cpp's C API: one thread owns the llama_context and decodes
every active sequence in one `llama_decode` per step.

Each step: drop cancelled sequences (their KV cells are freed with `llama_memory_seq_rm`), admit
waiting requests into free sequence slots, then fill one batch with the next token of every
decoding sequence plus a chunk of pending prompt (shortest first, small while others decode:
a long prompt never stalls running streams for more than one short step), decode, and sample each
sequence that produced logits with its own sampler chain. Results go back to the asyncio loop
with `call_soon_threadsafe`; the GIL is released inside every llama.cpp call.

Prefix caching (llama-server's `--cache-prompt`): a finished sequence leaves its KV cells in its
slot, and the slot remembers the tokens they hold (the prompt tokens fed plus the generated
tokens decoded; the last sampled token never was). A new request takes the free slot with the
longest common prefix (ties and no match: the least recently used), drops the cells after it
and prefills only the rest, always decoding at least its last prompt token for the logits.
A prefix held by another active sequence is copied from it instead (`llama_memory_seq_cp`;
with one KV stream per sequence llama.cpp copies whole streams, so the copy is trimmed after):
at once when its cells are written, otherwise the request waits, unscheduled, until the source
has fed that far, so requests sharing a system prompt that arrive together prefill it once.
When a slot's cached tokens are about to be overwritten, its sequence state is saved to host
memory (`llama_state_seq_get_data`, least recently used dropped past the byte budget) and
restored into a slot for a later prompt that shares more with it than with any slot.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as C
import numpy as np

from llmhost.engines.batching import BaseSequence, BatchLoop
from llmhost.engines.logprobs import log_softmax, token_logprob
from llmhost.types import TokenLogprob

log = logging.getLogger("llmhost.engines.llamacpp")

PENALTY_LAST_N = 64
# Fewest prompt tokens worth copying from another sequence: across KV streams llama.cpp copies
# a whole stream, and every prompt shares its first few tokens (BOS, the chat template's).
MIN_SHARE = 32
# Prompt tokens a step takes at least (fewer only when no more are waiting), and at most
# while other sequences are decoding (see plan_prefill).
PREFILL_FLOOR = 64
PREFILL_DECODING = 128


@dataclass(eq=False)
class Sequence(BaseSequence):
    """A request in a llama.cpp sequence slot, with its own sampler chain."""

    slot: int = -1
    sampler: Any = None
    # With logprobs the chain is split: `pre` (logit bias, penalties) changes the logits the
    # log-probabilities are taken from, `sampler` then picks (truncation, temperature, draw).
    pre: Any = None
    decoder: codecs.IncrementalDecoder = field(init=False)
    decoded: list[int] = field(default_factory=list)  # generated tokens whose KV is written
    source: Sequence | None = None  # waiting to copy `share` prompt tokens from its cells
    share: int = 0
    waited: int = 0  # steps it has been ready to prefill (its priority grows with them)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


class BatchScheduler(BatchLoop[Sequence]):
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
        prompt_cache: bool = True,
        prompt_cache_bytes: int = 0,
        on_idle: Callable[[], None] | None = None,
    ):
        super().__init__(n_slots=n_slots, max_queue=max_queue, log=log)
        self._on_idle = on_idle  # e.g. put the decode threads to sleep
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
        # Candidates for samplers run by hand (logprobs): llama_token_data laid out in numpy
        self._cand = np.zeros(
            n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        )
        self._cand_ptr = self._cand.ctypes.data_as(ctypes.POINTER(C.llama_token_data))
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._free_slots = set(range(n_slots))
        self.prompt_cache = prompt_cache
        self._cached: list[list[int]] = [[] for _ in range(n_slots)]  # KV held by a free slot
        self._used = [0] * n_slots  # when each slot was last released (LRU order)
        self._clock = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prefix_cache_requests_hit = 0
        # Host copies of slot states: their tokens -> (buffer, size), least recently used first
        self.host_budget = prompt_cache_bytes if prompt_cache else 0
        self._host: OrderedDict[tuple[int, ...], tuple[Any, int]] = OrderedDict()
        self._host_bytes = 0
        self._copying = False  # a stream copy waits for the next decode: no state reads/writes
        self._arrivals: list[Sequence] = []  # admitted, not yet given a slot
        self.start()

    def _idle(self) -> None:
        if self._on_idle is not None:
            self._on_idle()

    def _shutdown(self) -> None:
        C.llama_batch_free(self._batch)
        self._host.clear()
        self._host_bytes = 0

    def prefix_stats(self) -> dict[str, float]:
        return {
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_requests_hit": self.prefix_cache_requests_hit,
            "prompt_cache_bytes": self._host_bytes,
            "prompt_cache_budget_bytes": self.host_budget,
        }

    def _admit(self) -> None:
        # Under the lock only the hand-over: choosing a slot may save or restore a prefix
        # (megabytes copied), which must not hold up the event loop waiting on the lock.
        while self._waiting and len(self._arrivals) < len(self._free_slots):
            seq = self._waiting.popleft()
            self._active.append(seq)
            self._arrivals.append(seq)

    def _place_arrivals(self) -> None:
        """Give each admitted sequence its slot and the longest cached prefix there is."""
        arrivals, self._arrivals = self._arrivals, []
        for seq in arrivals:
            if not seq.cancelled:  # a cancelled one leaves at the next reaping
                self._place(seq)

    def _place(self, seq: Sequence) -> None:
        # A prompt whose log-probabilities are asked for is fed whole: cached cells have none.
        caching = self.prompt_cache and seq.cache_prompt and seq.sampling.prompt_logprobs is None
        limit = len(seq.prompt) - 1  # the last prompt token is always decoded
        # The longest cached prefix; then an empty slot, lowest first (dense slots batch
        # into fewer ubatches); then the least recently used.
        best, reuse, rank = -1, 0, None
        for slot in sorted(self._free_slots):
            n = common_prefix(self._cached[slot], seq.prompt, limit) if caching else 0
            key = (n, not self._cached[slot], -self._used[slot])
            if rank is None or key > rank:
                best, reuse, rank = slot, n, key
        self._free_slots.discard(best)
        seq.slot = best
        if len(self._cached[best]) - reuse >= MIN_SHARE:
            self._save(best)  # about to be overwritten
        self._cached[best] = []
        if caching and self._host:
            held, n = max(
                ((k, common_prefix(k, seq.prompt, limit)) for k in self._host),
                key=lambda kn: kn[1],
            )
            if n >= reuse + MIN_SHARE and self._restore(held, best):
                reuse = n
        seq.n_fed = self._trim(best, reuse)
        if caching:
            self.prefix_cache_queries += len(seq.prompt)
            self.prefix_cache_hits += seq.n_fed
            self._share(seq, limit)
            self.prefix_cache_requests_hit += seq.n_fed > 0 or seq.source is not None
        seq.sampler = self._make_sampler(seq)

    def _share(self, seq: Sequence, limit: int) -> None:
        """Copy a longer prefix from an active sequence's cells: now if they are written,
        else once the source has fed them (the sequence is not prefilled until then)."""
        src, share = None, seq.n_fed
        for other in self._active:
            if other is seq or other.slot < 0 or other.source is not None or other.cancelled:
                continue
            if not other.cache_prompt:
                continue
            n = common_prefix(other.prompt + other.decoded, seq.prompt, limit)
            # The same prompt (a request's n choices) is worth sharing however short it is.
            enough = n >= seq.n_fed + MIN_SHARE or (n == limit and other.prompt == seq.prompt)
            if enough and n > share:
                src, share = other, n
        if src is None:
            return
        if src.n_fed + len(src.decoded) >= share:
            self._copy(src, seq, share)
        else:
            seq.source, seq.share = src, share

    def _copy(self, src: Sequence, dst: Sequence, n: int) -> None:
        # Across KV streams llama.cpp copies whole buffers only (the copy happens at the
        # next decode, before that batch is written); then keep the first n positions.
        before = dst.n_fed
        self._copying = True
        C.llama_memory_seq_cp(self._mem, src.slot, dst.slot, -1, -1)
        dst.n_fed = self._trim(dst.slot, n)
        dst.source, dst.share = None, 0
        self.prefix_cache_hits += max(dst.n_fed - before, 0)

    def _save(self, slot: int) -> None:
        """Keep a host copy of the slot's state, within the byte budget."""
        tokens = tuple(self._cached[slot])
        if not self.host_budget or self._copying:
            return
        for key in self._host:
            if key[: len(tokens)] == tokens:  # already held (within a longer entry)
                self._host.move_to_end(key)
                return
        size = C.llama_state_seq_get_size(self.ctx, slot)
        if not 0 < size <= self.host_budget:
            return
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, slot)
        if n == 0:
            return
        for key in [k for k in self._host if tokens[: len(k)] == k]:  # superseded
            self._drop(key)
        while self._host and self._host_bytes + size > self.host_budget:
            self._drop(next(iter(self._host)))
        self._host[tokens] = (buf, n)
        self._host_bytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        buf, _ = self._host.pop(key)
        self._host_bytes -= ctypes.sizeof(buf)

    def _restore(self, key: tuple[int, ...], slot: int) -> bool:
        """Load a host copy into `slot` (replacing its cells)."""
        if self._copying:
            return False
        buf, n = self._host[key]
        self._host.move_to_end(key)
        if C.llama_state_seq_set_data(self.ctx, buf, n, slot):
            return True
        self._drop(key)
        C.llama_memory_seq_rm(self._mem, slot, -1, -1)
        return False

    def _trim(self, slot: int, n: int) -> int:
        """Keep the cells of positions [0, n) in `slot` and return how many were kept: none
        where the memory cannot drop a suffix (recurrent state) or no longer holds the first
        positions (a sliding-window cache), so the prompt is prefilled from its start."""
        mem = self._mem
        kept = n > 0 and C.llama_memory_seq_rm(mem, slot, n, -1)
        if kept and C.llama_memory_seq_pos_min(mem, slot) == 0:
            return n
        C.llama_memory_seq_rm(mem, slot, -1, -1)
        return 0

    def _sources_ready(self) -> None:
        for seq in self._active:
            src = seq.source
            if src is None:
                continue
            if src.slot < 0 or src.cancelled:  # gone: copy what it wrote, prefill the rest
                seq.source, seq.share = None, 0
                continue
            if src.n_fed + len(src.decoded) >= seq.share:
                self._copy(src, seq, seq.share)

    def _make_sampler(self, seq: Sequence) -> Any:
        sp = seq.sampling
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = C.llama_sampler_chain_add
        if sp.logit_bias:
            bias = (C.llama_logit_bias * len(sp.logit_bias))(
                *[C.llama_logit_bias(token=t, bias=b) for t, b in sp.logit_bias]
            )  # copied by llama.cpp
            add(chain, C.llama_sampler_init_logit_bias(self.n_vocab, len(sp.logit_bias), bias))
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
        if sp.logprobs is not None:
            seq.pre = chain
            chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
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
                C.llama_sampler_accept(seq.pre or chain, tok)
        return chain

    def _release(self, seq: Sequence) -> None:
        if seq in self._arrivals:
            self._arrivals.remove(seq)
        if seq.slot >= 0:
            for other in self._active:  # followers take what it has written so far
                if other.source is seq:
                    n = min(other.share, seq.n_fed)
                    if n >= other.n_fed + MIN_SHARE:
                        self._copy(seq, other, n)
                    other.source, other.share = None, 0
            slot = seq.slot
            if self.prompt_cache and seq.cache_prompt:
                # Exactly the tokens whose cells were written: a cancelled prefill keeps the
                # part it fed, the last sampled token (never decoded) is not among them.
                self._cached[slot] = seq.prompt[: seq.n_fed] + seq.decoded
            else:
                C.llama_memory_seq_rm(self._mem, slot, -1, -1)
                self._cached[slot] = []
            self._clock += 1
            self._used[slot] = self._clock
            self._free_slots.add(slot)
            seq.slot = -1
        for chain in (seq.sampler, seq.pre):
            if chain is not None:
                C.llama_sampler_free(chain)
        seq.sampler = seq.pre = None

    def _step(self) -> None:
        # Room first for every decoding sequence (one token each), then prompt chunks (see
        # plan_prefill). Tokens are then laid out by slot: with one KV stream per sequence,
        # llama.cpp batches together only runs of consecutive sequence ids, so the batch
        # must list slots in order (and empty slots are handed out lowest first).
        self._place_arrivals()
        self._sources_ready()
        active = [s for s in self._active if s.slot >= 0]
        plan = plan_prefill(active, self.batch_size)
        batch = self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        scored: list[tuple[Sequence, int, int]] = []  # (seq, batch index, prompt position)
        for seq in sorted(active, key=lambda s: s.slot):
            if not seq.prefilling:
                pos = len(seq.prompt) + seq.n_generated - 1
                self._put(n, seq.last_token, pos, seq.slot, True)
                seq.decoded.append(seq.last_token)
                outputs.append((seq, n))
                n += 1
                continue
            take = plan.get(seq.slot, 0)
            scoring = seq.sampling.prompt_logprobs is not None
            for j in range(take):
                pos = seq.n_fed + j
                last = pos == len(seq.prompt) - 1
                self._put(n, seq.prompt[pos], pos, seq.slot, last or scoring)
                if last:
                    outputs.append((seq, n))
                if scoring:
                    scored.append((seq, n, pos))
                n += 1
            seq.n_fed += take
        batch.n_tokens = n
        # Hand over the previous step's tokens now: the event loop formats and sends them
        # while llama_decode runs without the GIL, instead of contending with sampling.
        self._flush()
        if n == 0:  # only cancelled arrivals, reaped before the next step
            return
        rc = C.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        self._copying = False
        self.steps += 1
        for seq, idx, pos in scored:
            self._score_prompt(seq, idx, pos)
        for seq, idx in outputs:
            self._sample(seq, idx)

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = slot
        b.logits[i] = logits

    def _logits(self, idx: int) -> np.ndarray:
        return np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))

    def _score_prompt(self, seq: Sequence, idx: int, pos: int) -> None:
        """The log-probability of the prompt token after `pos`, from the raw logits there."""
        if seq.cancelled:
            return
        if pos == 0:
            seq.prompt_lps.append(TokenLogprob(seq.prompt[0], None))
        if pos + 1 < len(seq.prompt):
            lps = log_softmax(self._logits(idx))
            k = seq.sampling.prompt_logprobs or 0
            seq.prompt_lps.append(token_logprob(lps, seq.prompt[pos + 1], k))

    def _sample(self, seq: Sequence, idx: int) -> None:
        if seq.cancelled:
            return
        if seq.grammar is not None:
            # Masked in place in llama.cpp's logits: the sampler chain (penalties,
            # temperature, greedy) then sees only the tokens the grammar allows.
            seq.grammar.mask_logits(self._logits(idx))
        if seq.sampling.logprobs is not None:
            token, logprob = self._sample_by_hand(seq, idx)
            self._emit(seq, token, token in self._eog, logprob)
            return
        token = C.llama_sampler_sample(seq.sampler, self.ctx, idx)
        self._emit(seq, token, token in self._eog)

    def _sample_by_hand(self, seq: Sequence, idx: int) -> tuple[int, TokenLogprob]:
        """What llama_sampler_sample does with the whole chain, with the log-probabilities
        taken between its two halves: after bias and penalties, before the rest."""
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = self._logits(idx)
        cand["p"] = 0.0
        cur = C.llama_token_data_array(
            data=self._cand_ptr, size=self.n_vocab, selected=-1, sorted=False
        )
        C.llama_sampler_apply(seq.pre, ctypes.byref(cur))  # in place, order kept
        lps = log_softmax(cand["logit"])
        C.llama_sampler_apply(seq.sampler, ctypes.byref(cur))
        token = int(cand["id"][cur.selected])
        C.llama_sampler_accept(seq.pre, token)
        C.llama_sampler_accept(seq.sampler, token)
        return token, token_logprob(lps, token, seq.sampling.logprobs or 0)

    def _take(self, seq: Sequence, token: int) -> str:
        n = C.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return seq.decoder.decode(self._piece.raw[:n] if n > 0 else b"")

    def _tail(self, seq: Sequence) -> str:
        return seq.stops.flush() + seq.decoder.decode(b"", final=True)


def plan_prefill(active: list[Sequence], batch_size: int) -> dict[int, int]:
    """How many prompt tokens each prefilling slot feeds this step.

    Every decoding sequence has its token in the batch first. Prompts then go shortest
    remaining first (a prompt's rank improves with every step it waits, so none starves),
    and the step stops taking prompts once it holds PREFILL_FLOOR prompt tokens: requests
    arriving together get their first tokens one after another instead of all at the end
    of one long step. While sequences are decoding, a step holds at most PREFILL_DECODING
    prompt tokens, so a long prompt delays their next token by one short step at a time."""
    decoding = sum(1 for s in active if not s.prefilling)
    room = batch_size - decoding
    if decoding:
        room = min(room, max(PREFILL_DECODING, PREFILL_FLOOR))
    ready = [s for s in active if s.prefilling and s.source is None]
    for seq in ready:
        seq.waited += 1
    ready.sort(key=lambda s: ((len(s.prompt) - s.n_fed) / s.waited, s.slot))
    plan: dict[int, int] = {}
    taken = 0
    for seq in ready:
        if room <= 0 or taken >= PREFILL_FLOOR:
            break
        take = min(len(seq.prompt) - seq.n_fed, room)
        plan[seq.slot] = take
        room -= take
        taken += take
    return plan


def common_prefix(a: Sequence_[int], b: Sequence_[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
