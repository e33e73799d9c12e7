"""Log-probabilities from a row of logits, as the OpenAI API reports them: the chosen token's
and the likeliest alternatives', shared by every in-process engine."""

from __future__ import annotations

import numpy as np

from llmhost.types import TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) in float32, stable for rows holding -inf (masked tokens)."""
    shifted = np.asarray(logits, dtype=np.float32) - np.float32(logits.max())
    out: np.ndarray = shifted - np.float32(np.log(np.exp(shifted, dtype=np.float64).sum()))
    return out


def token_logprob(logprobs: np.ndarray, token: int, k: int) -> TokenLogprob:
    """`token`'s entry, with the `k` likeliest tokens of the row (likeliest first, ties by id)."""
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        k = min(k, logprobs.shape[0])
        idx = np.argpartition(logprobs, -k)[-k:]
        idx = idx[np.lexsort((idx, -logprobs[idx]))]
        top = tuple((int(i), float(logprobs[i])) for i in idx)
    return TokenLogprob(int(token), float(logprobs[token]), top)
