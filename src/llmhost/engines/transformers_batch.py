"""Continuous batching for transformers models: one thread owns the model and decodes every
running sequence in one forward pass per step, over one KV cache whose rows are sequences.

Rows have different lengths, so the cache is left-padded: row i holds its tokens in the last
`kv_len` columns and a 0/1 mask hides the rest; every row gets its own position ids, so rotary
embeddings see true positions. Each step: drop finished and cancelled rows (and the columns no
row uses any more), prefill newly admitted prompts together in one left-padded pass (a prompt
longer than the batch budget is fed alone, chunk by chunk, between decode steps), merge their
caches into the running one, decode one token for every row, and sample each row with its own
settings and generator. Torch releases the GIL inside its kernels, so the event loop sends the
previous step's tokens while the next forward pass runs.

Prompt cache: when a row leaves, the KV of the tokens it fed through the model is copied to host
memory (`PromptCache`, least recently used first out, within a byte budget). An admitted prompt
takes the entry with the longest common prefix, cropped so at least its last token is fed again
(its logits start the output), and prefills only the rest, like a chunked prompt resumed.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from llmhost.engines.batching import BaseSequence, BatchLoop
from llmhost.engines.logprobs import log_softmax, token_logprob
from llmhost.types import SamplingParams, TokenLogprob

log = logging.getLogger("llmhost.engines.transformers")

PENALTY_LAST_N = 64  # the same window as the llama.cpp engine's penalties
DETOKENIZE_CONTEXT = 4  # prompt tokens decoded with the output, so word boundaries come out right
PROMPT_CACHE_ENTRIES = 64  # at most this many cached prefixes (each lookup scans them all)
MIN_REUSE = 2  # shorter common prefixes are prefilled with the batch instead


class Detokenizer:
    """Incremental text from token ids, decoded after `context` (the prompt's last tokens, so
    word boundaries come out right). Text is given out once it no longer ends in an incomplete
    UTF-8 sequence: by tokenizers' DecodeStream for a fast tokenizer (`backend`), by decoding
    the same short window twice per token with `decode` for a slow one; `flush` gives out what
    is still held when the sequence ends."""

    def __init__(self, decode: Callable[[list[int]], str], context: list[int], backend: Any = None):
        self._decode = decode
        self._backend = backend
        self._last = list(context)  # the tokens of the text given out last
        self._held: list[int] = []  # tokens since, not yet given out
        self._stream = None if backend is None else self._new_stream()

    def _new_stream(self) -> Any:
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        for token in self._last:
            stream.step(self._backend, token)
        return stream

    def add(self, token: int) -> str:
        self._held.append(token)
        text: str | None = None
        if self._stream is not None:
            try:
                out = self._stream.step(self._backend, token)
                text = out if isinstance(out, str) else None
            except Exception:  # its text no longer starts with what it gave out: decode here
                self._stream = None
        if self._stream is None:
            before = self._decode(self._last)
            after = self._decode(self._last + self._held)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                text = after[len(before) :]
        if not text:
            return ""
        self._last, self._held = self._held, []
        return text

    def flush(self) -> str:
        if not self._held:
            return ""
        before = self._decode(self._last)
        after = self._decode(self._last + self._held)
        self._last, self._held = self._held, []
        return after[len(before) :]


@dataclass(eq=False)
class Sequence(BaseSequence):
    """A request in the transformers batch."""

    kv_len: int = 0  # tokens of this sequence in the KV cache
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    cache: Any = None  # its own cache while a long prompt is fed in chunks
    detok: Detokenizer | None = None
    looked_up: bool = False  # the prompt cache was asked for its prefix

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature <= 0.0

    @property
    def scoring(self) -> bool:
        """The prompt's log-probabilities are asked for: it is fed alone, with every logit."""
        return self.sampling.prompt_logprobs is not None

    @property
    def plain(self) -> bool:
        """Greedy on the raw logits: the batch's argmax is its token."""
        sp = self.sampling
        return (
            self.greedy
            and not self.penalised
            and not sp.ignore_eos
            and not sp.logit_bias
            and sp.logprobs is None
        )

    @property
    def penalised(self) -> bool:
        sp = self.sampling
        return sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0


def new_cache(config: Any) -> Any:
    return DynamicCache(config=config)


class KVLayer(Protocol):
    """One layer of a cache in the batch: its tensors are always there once it holds rows
    (transformers declares them optional for an empty cache)."""

    keys: torch.Tensor
    values: torch.Tensor
    device: torch.device
    is_initialized: bool


def cache_kv(cache: Any) -> list[KVLayer]:
    return list(cache.layers)


def batchable(cache: Any) -> bool:
    """Whether rows of this cache type can be merged and dropped (plain full-attention
    layers); sliding-window or recurrent caches are served one sequence at a time."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class CachedPrefix:
    """The KV of `tokens` (one row, on the host), per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nbytes: int


class PromptCache:
    """Host-memory KV of finished sequences keyed by their tokens, least recently used first
    out, within `budget` bytes and `PROMPT_CACHE_ENTRIES` entries. Used by one thread."""

    def __init__(self, budget: int, max_entries: int = PROMPT_CACHE_ENTRIES):
        self.budget = max(0, budget)
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self.nbytes = 0

    def longest(self, prompt: list[int]) -> tuple[int, CachedPrefix | None]:
        """The entry sharing the longest prefix with `prompt`, and that length."""
        best, found = 0, None
        for tokens in self.entries:
            n = common_prefix(tokens, prompt)
            if n > best:
                best, found = n, tokens
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        return best, self.entries[found]

    def covers(self, tokens: tuple[int, ...]) -> bool:
        """Whether an entry already holds `tokens` as (a prefix of) its own; touches it."""
        for key in self.entries:
            if len(key) >= len(tokens) and key[: len(tokens)] == tokens:
                self.entries.move_to_end(key)
                return True
        return False

    def put(self, tokens: tuple[int, ...], entry: CachedPrefix) -> None:
        if entry.nbytes > self.budget:
            return
        for key in [k for k in self.entries if tokens[: len(k)] == k]:  # superseded prefixes
            self._drop(key)
        while self.entries and (
            self.nbytes + entry.nbytes > self.budget or len(self.entries) >= self.max_entries
        ):
            self._drop(next(iter(self.entries)))
        self.entries[tokens] = entry
        self.nbytes += entry.nbytes

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def apply_penalties(logits: torch.Tensor, history: list[int], sp: SamplingParams) -> None:
    """llama.cpp's penalties, in place: repeat divides positive logits and multiplies negative
    ones; frequency and presence subtract per occurrence and once, over the last 64 tokens."""
    if not history:
        return
    ids, counts = torch.unique(
        torch.tensor(history[-PENALTY_LAST_N:], device=logits.device), return_counts=True
    )
    vals = logits[ids]
    if sp.repeat_penalty != 1.0:
        vals = torch.where(vals > 0, vals / sp.repeat_penalty, vals * sp.repeat_penalty)
    vals = vals - counts.to(vals.dtype) * sp.frequency_penalty - sp.presence_penalty
    logits[ids] = vals


def sample_token(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator) -> int:
    """top-k -> top-p -> min-p -> temperature -> draw, in the llama.cpp engine's order."""
    if 0 < sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cum - sorted_logits.softmax(-1) >= sp.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if sp.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < sp.min_p * probs.max(), float("-inf"))
    probs = (logits / sp.temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchScheduler(BatchLoop[Sequence]):
    """Owns the model; every forward pass happens on its thread."""

    thread_name = "transformers-batch"

    def __init__(
        self,
        model: Any,
        decode: Any,
        eos_ids: set[int],
        *,
        n_slots: int,
        batch_size: int,
        max_queue: int,
        cache_arg: str,
        config: Any,
        prompt_cache: bool = False,
        prompt_cache_bytes: int = 0,
        tokenizer_backend: Any = None,
    ):
        super().__init__(n_slots=n_slots, max_queue=max_queue, log=log)
        self.model = model
        self.decode = decode
        self.tokenizer_backend = tokenizer_backend  # a fast tokenizer's, for DecodeStream
        self.eos_ids = set(eos_ids)
        self._eos_index = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        self.batch_size = batch_size
        self.device = model.device
        self._cache_arg = cache_arg
        self._config = config
        self._pending: list[Sequence] = []  # admitted; prompt not (fully) in a cache yet
        self._rows: list[Sequence] = []  # the running cache's rows, in order
        self._dead: set[Sequence] = set()
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, columns], 1 where a row has a token
        self._prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache else None
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prefix_cache_requests_hit = 0
        self.start()

    def _thread_context(self) -> contextlib.AbstractContextManager[object]:
        return torch.inference_mode()

    def _shutdown(self) -> None:
        self._cache = self._mask = None
        self._rows.clear()
        self._pending.clear()
        if self._prompt_cache is not None:
            self._prompt_cache.clear()

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        pc = self._prompt_cache
        stats.update(
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            prefix_cache_requests_hit=self.prefix_cache_requests_hit,
            prompt_cache_bytes=pc.nbytes if pc is not None else 0,
            prompt_cache_budget_bytes=pc.budget if pc is not None else 0,
        )
        return stats

    # --- admission and release --------------------------------------------------------------

    def _admit(self) -> None:
        while self._waiting and self.free_slots() > 0:
            seq: Sequence = self._waiting.popleft()
            seed = secrets.randbits(63) if seq.sampling.seed is None else seq.sampling.seed
            if not seq.greedy:
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            seq.detok = Detokenizer(
                self.decode, seq.prompt[-DETOKENIZE_CONTEXT:], self.tokenizer_backend
            )
            self._active.append(seq)
            self._pending.append(seq)

    def _release(self, seq: Sequence) -> None:
        if seq in self._pending:
            self._pending.remove(seq)
        seq.cache = None
        if seq in self._rows:
            self._dead.add(seq)

    # --- the step ------------------------------------------------------------------------

    def _step(self) -> None:
        self._compact()
        # Hand over the previous step's tokens now: the event loop formats and sends them
        # while the forward pass runs with the GIL released.
        self._flush()
        if self._pending:
            self._prefill()
            # A stream cancelled during the prefill joined the rows without a sampled token:
            # drop it before the decode feeds that row.
            self._dead.update(s for s in self._rows if s.cancelled)
            self._compact()
        if self._rows:
            self._decode()
            self._compact()
        self.steps += 1

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        pos: torch.Tensor,
        cache: Any,
        every: bool = False,
    ) -> torch.Tensor:
        """The last position's logits of each row, or with `every` all positions' ([1, n, V])."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=0 if every else 1,
            **{self._cache_arg: cache},
        )
        logits: torch.Tensor = out.logits
        return logits.float() if every else logits[:, -1, :].float()

    def _prefill(self) -> None:
        for seq in self._pending:
            if not seq.looked_up:
                self._reuse_prefix(seq)
        first = self._pending[0]
        if first.n_fed or len(first.prompt) > self.batch_size or first.scoring:
            self._prefill_chunk(first)
            return
        group: list[Sequence] = []
        unique: dict[tuple[int, ...], int] = {}  # prompt -> its row in the forward pass
        width = 0
        for seq in self._pending:
            if seq.n_fed or len(seq.prompt) > self.batch_size or seq.scoring:
                break
            key = tuple(seq.prompt)
            if key not in unique:
                w = max(width, len(seq.prompt))
                if unique and w * (len(unique) + 1) > self.batch_size:
                    break
                unique[key] = len(unique)
                width = w
            group.append(seq)
        ids = torch.zeros((len(unique), width), dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for prompt, i in unique.items():
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask == 0).any())
        cache = new_cache(self._config)
        logits = self._forward(
            ids.to(self.device),
            mask.to(self.device) if padded else None,
            pos.to(self.device),
            cache,
        )
        rows = [unique[tuple(seq.prompt)] for seq in group]
        if len(rows) > len(unique):
            # The same prompt (a request's n choices) was fed once; its rows are repeated.
            idx = torch.tensor(rows, device=self.device)
            for layer in cache_kv(cache):
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
            logits, mask = logits.index_select(0, idx), mask.index_select(0, idx.cpu())
        for seq in group:
            seq.n_fed = seq.kv_len = len(seq.prompt)
            self._pending.remove(seq)
        self._join(group, cache, mask.to(self.device))
        self._sample(group, logits)

    def _prefill_chunk(self, seq: Sequence) -> None:
        take = min(self.batch_size, len(seq.prompt) - seq.n_fed)
        if seq.cache is None:
            seq.cache = new_cache(self._config)
        ids = torch.tensor([seq.prompt[seq.n_fed : seq.n_fed + take]], device=self.device)
        pos = torch.arange(seq.n_fed, seq.n_fed + take, device=self.device)[None]
        if seq.scoring:
            every = self._forward(ids, None, pos, seq.cache, every=True)[0]
            self._score_prompt(seq, every)
            logits = every[-1:]
        else:
            logits = self._forward(ids, None, pos, seq.cache)
        seq.n_fed += take
        if seq.prefilling:
            return
        self._pending.remove(seq)
        seq.kv_len = len(seq.prompt)
        cache, seq.cache = seq.cache, None
        self._join([seq], cache, torch.ones((1, seq.kv_len), dtype=torch.long, device=self.device))
        self._sample([seq], logits)

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.last_token] for s in rows], device=self.device)
        pos = torch.tensor([[s.kv_len] for s in rows], device=self.device)
        assert self._mask is not None
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        padded = bool((mask == 0).any())
        logits = self._forward(ids, mask if padded else None, pos, self._cache)
        self._mask = mask
        for s in rows:
            s.kv_len += 1
        self._sample(list(rows), logits)

    # --- the prompt cache -----------------------------------------------------------------

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start `seq` from the longest cached prefix of its prompt: its own cache holds that
        prefix and only the rest is prefilled (at least the last prompt token, for logits)."""
        seq.looked_up = True
        pc = self._prompt_cache
        if pc is None or not seq.cache_prompt or seq.n_fed or seq.scoring:
            return
        self.prefix_cache_queries += len(seq.prompt)
        n, entry = pc.longest(seq.prompt)
        n = min(n, len(seq.prompt) - 1)
        if entry is None or n < MIN_REUSE:
            return
        cache = new_cache(self._config)
        for layer, k, v in zip(cache_kv(cache), entry.keys, entry.values, strict=True):
            layer.keys = k[:, :, :n].to(self.device, copy=True)
            layer.values = v[:, :, :n].to(self.device, copy=True)
            layer.device = layer.keys.device
            layer.is_initialized = True
        seq.cache, seq.n_fed = cache, n
        self.prefix_cache_hits += n
        self.prefix_cache_requests_hit += 1

    def _keep_prefix(self, row: int, seq: Sequence) -> None:
        """Copy the KV of the tokens `seq` fed (row `row` of the running cache) to the host."""
        pc = self._prompt_cache
        if pc is None or not seq.cache_prompt or pc.budget == 0 or seq.kv_len == 0:
            return
        fed = seq.kv_len - len(seq.prompt)
        tokens = tuple(seq.prompt) + tuple(seq.generated[:fed])
        if len(tokens) != seq.kv_len or pc.covers(tokens):
            return
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in cache_kv(self._cache):
            for src, dst in ((layer.keys, keys), (layer.values, values)):
                dst.append(
                    src[row : row + 1, :, -seq.kv_len :].to(
                        "cpu", copy=True, memory_format=torch.contiguous_format
                    )
                )
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        pc.put(tokens, CachedPrefix(keys, values, nbytes))

    # --- the batch cache -----------------------------------------------------------------

    def _join(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        """Append `cache`'s rows to the running cache, left-padding the shorter one."""
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(seqs)
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return F.pad(t, (0, 0, n, 0)) if n else t

        a_pad = width - self._mask.shape[1]
        b_pad = width - mask.shape[1]
        for mine, theirs in zip(cache_kv(self._cache), cache_kv(cache), strict=True):
            mine.keys = torch.cat([pad(mine.keys, a_pad), pad(theirs.keys, b_pad)])
            mine.values = torch.cat([pad(mine.values, a_pad), pad(theirs.values, b_pad)])
        self._mask = torch.cat([F.pad(self._mask, (a_pad, 0)), F.pad(mask, (b_pad, 0))])
        self._rows.extend(seqs)

    def _compact(self) -> None:
        """Drop rows whose sequences left, then columns that no remaining row uses."""
        if not self._dead:
            return
        keep = []
        for i, s in enumerate(self._rows):
            if s in self._dead:
                self._keep_prefix(i, s)
            else:
                keep.append(i)
        self._dead.clear()
        if not keep:
            self._cache = self._mask = None
            self._rows = []
            return
        assert self._mask is not None
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        start = int(mask.any(0).nonzero()[0])
        for layer in cache_kv(self._cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]

    # --- sampling and output -------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for i, seq in enumerate(seqs):
            if seq.grammar is not None and not seq.cancelled:
                seq.grammar.mask_row(logits[i])
        greedy = logits.argmax(-1).tolist() if all(s.plain for s in seqs) else None
        for i, seq in enumerate(seqs):
            if seq.cancelled:
                continue
            logprob = None
            if greedy is not None:
                token = greedy[i]
            else:
                token, logprob = self._pick(seq, logits[i])
            self._emit(seq, token, token in self.eos_ids, logprob)

    def _pick(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Bias, EOS ban and penalties change the logits (which log-probabilities are read
        from), then the token is chosen; the llama.cpp engine's order."""
        sp = seq.sampling
        if sp.logit_bias:
            ids = torch.tensor([t for t, _ in sp.logit_bias], device=logits.device)
            logits.index_add_(0, ids, torch.tensor([b for _, b in sp.logit_bias]).to(logits))
        if sp.ignore_eos and len(self._eos_index):
            logits[self._eos_index.to(logits.device)] = float("-inf")
        if seq.penalised:
            apply_penalties(logits, seq.prompt[-PENALTY_LAST_N:] + seq.generated, sp)
        if seq.greedy:
            token = int(logits.argmax())
        else:
            assert seq.generator is not None
            token = sample_token(logits, sp, seq.generator)
        if sp.logprobs is None:
            return token, None
        lps = log_softmax(logits.cpu().numpy())
        return token, token_logprob(lps, token, sp.logprobs)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after this chunk's positions (raw logits)."""
        start = seq.n_fed
        if start == 0:
            seq.prompt_lps.append(TokenLogprob(seq.prompt[0], None))
        rows = logits.cpu().numpy()
        k = seq.sampling.prompt_logprobs or 0
        for j in range(rows.shape[0]):
            nxt = start + j + 1
            if nxt < len(seq.prompt):
                seq.prompt_lps.append(token_logprob(log_softmax(rows[j]), seq.prompt[nxt], k))

    def _take(self, seq: Sequence, token: int) -> str:
        assert seq.detok is not None
        seq.generated.append(token)
        return seq.detok.add(token)

    def _tail(self, seq: Sequence) -> str:
        assert seq.detok is not None
        text, hit = seq.stops.feed(seq.detok.flush())
        return text if hit else text + seq.stops.flush()
