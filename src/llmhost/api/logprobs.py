"""Log-probabilities in the two shapes the OpenAI API reports them: chat's list of token
entries (token, logprob, bytes, top_logprobs) and the completions' parallel lists."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from llmhost.types import TokenLogprob

# What OpenAI reports for a token that cannot be chosen (JSON has no -Infinity)
FLOOR = -9999.0


def token_text(piece: bytes) -> str:
    """A token as text; one that is part of a UTF-8 character is shown as its bytes."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def _value(lp: float) -> float:
    return lp if math.isfinite(lp) else FLOOR


class LogprobShaper:
    """Shapes one choice's token log-probabilities; tracks the text offset of the legacy
    shape across the chunks of a stream."""

    def __init__(self, token_bytes: Callable[[int], bytes], *, chat: bool, offset: int = 0):
        self.token_bytes = token_bytes
        self.chat = chat
        self.offset = offset

    def _entry(self, token: int, lp: float) -> dict[str, Any]:
        piece = self.token_bytes(token)
        return {"token": token_text(piece), "logprob": _value(lp), "bytes": list(piece)}

    def shape(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The `logprobs` object of a choice (or a chunk's choice) for these tokens."""
        if self.chat:
            content = []
            for t in lps:
                entry = self._entry(t.token, t.logprob if t.logprob is not None else 0.0)
                entry["top_logprobs"] = [self._entry(i, v) for i, v in t.top]
                content.append(entry)
            return {"content": content, "refusal": None}
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for t in lps:
            text = token_text(self.token_bytes(t.token))
            tokens.append(text)
            values.append(None if t.logprob is None else _value(t.logprob))
            if t.logprob is None:
                tops.append(None)
            else:
                top: dict[str, float] = {}
                for i, v in t.top:
                    top.setdefault(token_text(self.token_bytes(i)), _value(v))
                tops.append(top)
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def merge(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """The logprobs of a whole choice from its chunks' objects."""
        if not parts:
            return None
        if self.chat:
            return {"content": [e for p in parts for e in p["content"]], "refusal": None}
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {k: [v for p in parts for v in p[k]] for k in keys}
