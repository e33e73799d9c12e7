"""The shapes of OpenAI responses and SSE events: how each endpoint names its choices, the
choices one engine delta makes, and the bytes of a stream's events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from llmhost.types import TokenDelta, Usage

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Kind:
    """How one endpoint names and shapes its choices."""

    id_prefix: str
    object: str
    chunk_object: str
    body_key: str  # where a choice's content goes: "message" (chat) or inline (completions)


COMPLETION = Kind("cmpl", "text_completion", "text_completion", "")
CHAT = Kind("chatcmpl", "chat.completion", "chat.completion.chunk", "message")


def usage_body(u: Usage | None) -> dict[str, int]:
    u = u or Usage(0, 0)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def whole_choice(
    kind: Kind,
    body: dict[str, Any],
    finish: str | None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    inner = {kind.body_key: body} if kind.body_key else body
    return {"index": index, **inner, "finish_reason": finish, "logprobs": logprobs}


def chunk_choices(
    kind: Kind,
    shaper: Any,
    d: TokenDelta,
    opening: bool,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The choices of the chunks one engine delta makes; the finish reason and the delta's
    log-probabilities ride on the last."""
    pieces = shaper.deltas(d)
    if kind.body_key and opening:
        pieces = [{"role": "assistant", **(pieces[0] if pieces else {})}, *pieces[1:]]
    finish = shaper.finish_reason(d.finish_reason)
    if not pieces and finish is None and logprobs is None:
        return []
    if not pieces:
        pieces = [{} if kind.body_key else {"text": ""}]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        inner = {"delta": piece} if kind.body_key else piece
        out.append(
            {
                "index": index,
                **inner,
                "finish_reason": finish if last else None,
                "logprobs": logprobs if last else None,
            }
        )
    return out


# Characters JSON may hold raw that line readers built on str.splitlines() (httpx's
# aiter_lines, among others) take for line breaks, cutting an event in two: sent escaped.
_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def json_line(obj: Any) -> bytes:
    """`obj` as JSON on one line for every line reader (see _LINE_BREAKS)."""
    data = orjson.dumps(obj)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        for raw, escaped in _LINE_BREAKS:
            data = data.replace(raw, escaped)
    return data


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json_line(obj) + b"\n\n"


class ChunkWriter:
    """The SSE events of one stream. A plain text delta, nearly every chunk, is written into
    the stream's pre-rendered event: only the text itself is JSON-encoded."""

    _MARK = "\x00"

    def __init__(self, head: dict[str, Any], kind: Kind, include_usage: bool):
        self.base = {**head, "object": kind.chunk_object}
        self.include_usage = include_usage
        self.chat = bool(kind.body_key)
        plain = {"content": self._MARK} if self.chat else {"text": self._MARK}
        inner = {"delta": plain} if self.chat else plain
        sample = self._full({"index": 0, **inner, "finish_reason": None, "logprobs": None})
        self.before, self.after = sample.rsplit(orjson.dumps(self._MARK), 1)

    def _full(self, choice: dict[str, Any]) -> bytes:
        obj = {**self.base, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return sse(obj)

    def chunk(self, choice: dict[str, Any]) -> bytes:
        plain = choice.get("logprobs") is None and not choice["index"]
        if plain and choice["finish_reason"] is None:
            part = choice["delta"] if self.chat else choice
            if len(part) == (1 if self.chat else 4):
                text = part.get("content" if self.chat else "text")
                if type(text) is str:
                    return self.before + json_line(text) + self.after
        return self._full(choice)

    def usage(self, usage: dict[str, int]) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage})
