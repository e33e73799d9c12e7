"""Constrained decoding for the in-process engines: a `Constraint` (JSON schema, any JSON object,
or a Lark grammar) compiled with llguidance against the model's tokenizer, and per sequence a
matcher that masks the logits before sampling and says when the output is complete.

Why llguidance: measured on the TinyLlama-shaped GGUF (32000 tokens, 2 CPU cores) with a
20-field schema (enums, bounded strings and integers, an array, a nested object):

    library         compile first / other schema / cached   mask per token (median, mean, p90)
    llguidance 1.9  1.5 ms / 1.4 ms / 0.01 ms (deep copy)    12 us, 73 us, 300 us (+14 us apply)
    xgrammar 0.2.8  108 ms / 14 ms / 0.3 ms                  2 us, 167 us, 300 us
    llama.cpp GBNF  3.3 ms (convert + init)                  2.2 ms, 5.5 ms, 11 ms (max 180 ms)

One greedy stream, 48 tokens: 60 tok/s unconstrained, 60 with llguidance, 61 with xgrammar, 52
with GBNF (which also ignores integer bounds in llama-cpp-python's schema converter).
llguidance compiles fastest, masks as fast as xgrammar, and serves both engines (llama.cpp
vocab and Hugging Face tokenizer adapters) through one code path. In the llama.cpp engine
(benchmarks/constrained_decoding.py, same lengths): 50.6 vs 50.5 tok/s constrained vs not at 1
stream, 70.6 vs 69.0 at 8; the vocabulary is read once in ~0.12 s.

The tokenizer adapter is built once per model, on first use and off the event loop. Compiled
grammars are kept per constraint in a bounded LRU; a sequence gets a copy of the cached
matcher (about 10 us). JSON is generated with at most one space between tokens (`{"a": 1}` and
`{"a":1}` both pass), so a model can never spin on whitespace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

import llguidance
import numpy as np

from llmhost.errors import InvalidRequest
from llmhost.types import Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger("llmhost.engines.grammar")

PARAM = "response_format"
MAX_SOURCE_CHARS = 100_000  # a schema or grammar larger than this is refused unread
CACHE_SIZE = 128
# JSON layout: at most one space wherever JSON allows whitespace; a schema's own "x-guidance"
# options may override it.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": "[ ]?"}


# Bounds on what one grammar may cost (llguidance's units; ~50k fuel/ms to build the lexer,
# ~14k/ms per mask step).
class _Limits(TypedDict):
    max_grammar_size: int
    initial_lexer_fuel: int
    step_lexer_fuel: int
    step_max_items: int
    max_lexer_states: int


LIMITS: _Limits = {
    "max_grammar_size": 200_000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 100_000,
}


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(verbose_errors=False, **LIMITS)


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint; InvalidRequest when it cannot be one."""
    if len(constraint.source) > MAX_SOURCE_CHARS:
        raise InvalidRequest(
            f"the {constraint.kind} is {len(constraint.source)} characters; at most "
            f"{MAX_SOURCE_CHARS} are accepted",
            param=PARAM,
        )
    if constraint.kind == "json_object":
        schema: Any = {"type": "object"}
    elif constraint.kind == "json_schema":
        try:
            schema = json.loads(constraint.source)
        except ValueError as exc:
            raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}", param=PARAM) from exc
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("the JSON schema must be an object", param=PARAM)
    elif constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.source)
    else:
        raise InvalidRequest(f"unknown constraint kind {constraint.kind!r}", param=PARAM)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}", param=PARAM) from exc


def hf_tokenizer(tokenizer: Any, n_vocab: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer (a fast one: its Rust tokenizer is read)."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos or None)
    except ValueError as exc:
        raise InvalidRequest(
            f"this model's tokenizer cannot be used for constrained output: {exc}", param=PARAM
        ) from exc


def llamacpp_tokenizer(vocab: Any, n_vocab: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a llama.cpp vocabulary: every token's bytes, control tokens (and
    user-defined ones that look like them) marked special with a 0xff prefix, as llguidance's
    own adapter does, without its deprecated per-token calls."""
    import ctypes

    import llama_cpp as C

    buf = ctypes.create_string_buffer(16 * 1024)
    control, user = C.LLAMA_TOKEN_ATTR_CONTROL, C.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens: list[bytes] = []
    for t in range(n_vocab):
        n = C.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        piece = buf.raw[: max(n, 0)]
        attr = C.llama_vocab_get_attr(vocab, t)
        if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(C.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    # from_llamacpp is missing from llguidance's stubs (its own adapter ignores it too).
    tok: llguidance.LLTokenizer = llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=eos
    )
    return tok


class Grammar:
    """A compiled constraint: a matcher in its start state, copied for each sequence."""

    def __init__(self, template: llguidance.LLMatcher, n_vocab: int):
        self._template = template
        self.n_vocab = n_vocab

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.n_vocab)


class Matcher:
    """One sequence's place in its grammar. On the scheduler thread, per step: `mask_logits`
    (or `mask_row` for torch) before sampling, then `advance` with the sampled token."""

    __slots__ = ("_m", "_mask", "_n")

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        self._m = matcher
        self._n = n_vocab
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def _allowed(self, n: int) -> np.ndarray:
        """The allowed-token mask for the next token, as `n` booleans."""
        self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little", count=min(n, self._n))
        if n > self._n:  # logits wider than the tokenizer (padded embedding rows)
            bits = np.concatenate([bits, np.zeros(n - self._n, np.uint8)])
        return bits.view(bool)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place."""
        np.copyto(logits, -np.inf, where=~self._allowed(logits.shape[0]))

    def mask_row(self, row: Any) -> None:
        """The same for a 1-D torch tensor (CPU: through a numpy view; else one transfer)."""
        if row.device.type == "cpu" and row.is_contiguous():
            self.mask_logits(row.numpy())
            return
        import torch

        forbid = torch.from_numpy(~self._allowed(row.shape[0])).to(row.device, non_blocking=True)
        row.masked_fill_(forbid, float("-inf"))

    def advance(self, token: int) -> bool:
        """Take a sampled (non-end) token; True when the output is complete: the grammar
        admits nothing more, or the token broke it (which masking prevents)."""
        if not self._m.consume_token(token):
            log.warning("constrained output ended early: %s", _one_line(self._m.get_error()))
            return True
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()


class GrammarCompiler:
    """Compiles constraints for one loaded model. `tokenizer` builds llguidance's view of the
    vocabulary (a second or so for a large one): it runs once, on the first compile, which
    callers run in a worker thread."""

    def __init__(
        self,
        tokenizer: Callable[[], llguidance.LLTokenizer],
        n_vocab: int,
        *,
        cache_size: int = CACHE_SIZE,
    ):
        self._make_tokenizer = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.n_vocab = n_vocab
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, Grammar | InvalidRequest] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def cached(self, constraint: Constraint) -> Grammar | None:
        """The compiled grammar when it is in the cache (cheap: safe on the event loop);
        raises the cached InvalidRequest for a constraint already found invalid."""
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is None:
                return None
            self._cache.move_to_end(constraint)
        if isinstance(hit, InvalidRequest):
            raise InvalidRequest(hit.message, param=hit.param)
        return hit

    def compile(self, constraint: Constraint) -> Grammar:
        """Compile (or fetch) `constraint`; InvalidRequest naming what is wrong with it."""
        found = self.cached(constraint)
        if found is not None:
            return found
        try:
            result: Grammar | InvalidRequest = self._compile(constraint)
        except InvalidRequest as exc:
            result = exc
        with self._lock:
            self._cache[constraint] = result
            self._cache.move_to_end(constraint)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, InvalidRequest):
            raise result
        return result

    def check(self, constraint: Constraint) -> None:
        """Raise InvalidRequest when `constraint` cannot be compiled."""
        self.compile(constraint)

    def _compile(self, constraint: Constraint) -> Grammar:
        text = grammar_text(constraint)
        tok = self.tokenizer()
        # Builds the lexer and parser without the GIL; errors leave the matcher in an error
        # state instead of raising.
        m = llguidance.LLMatcher(tok, text, log_level=0, limits=_limits())
        if m.is_error():
            what = {"lark": "grammar", "json_object": "JSON object"}.get(
                constraint.kind, "JSON schema"
            )
            raise InvalidRequest(f"invalid {what}: {_one_line(m.get_error())}", param=PARAM)
        return Grammar(m, self.n_vocab)


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(message.split()) or "rejected by the compiler"
    return text if len(text) <= limit else text[: limit - 3] + "..."
