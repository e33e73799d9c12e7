"""The SSE events of a stream: the pre-rendered fast path for plain text must give byte for
byte what encoding the whole chunk gives, and everything else must take the full path."""

from __future__ import annotations

import json

import pytest

from llmhost.api.sse import CHAT, COMPLETION, ChunkWriter, sse

HEAD = {"id": "chatcmpl-x", "created": 1764180000, "model": "m\u00e9/\\x00"}
TEXTS = [
    "",
    " word",
    'quote " and \\ back',
    "\u00e9t\u00e9 \U0001f600",
    "\x00\x1f\n\t",
    "\u2028\u0085",
]


def full(kind, choice, include_usage):
    obj = {**HEAD, "object": kind.chunk_object, "choices": [choice]}
    if include_usage:
        obj["usage"] = None
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch in ("\u0085", "\u2028", "\u2029"):  # sent escaped (see test below)
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return b"data: " + text.encode() + b"\n\n"


@pytest.mark.parametrize("text", ["a\u2028b", "\u0085", "x\u2029y\u2028", "\u00852028"])
def test_characters_line_readers_break_on_stay_on_one_line(text):
    import httpx

    w = ChunkWriter(HEAD, CHAT, False)
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}
    for event in (w.chunk(choice), sse({"choices": [choice]})):
        lines = httpx._decoders.LineDecoder().decode(event.decode())
        data = [line for line in lines if line]
        assert len(data) == 1, data  # httpx's aiter_lines splits on U+0085, U+2028, U+2029
        parsed = json.loads(data[0][len("data: ") :])
        assert parsed["choices"][0]["delta"]["content"] == text


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_chunks_equal_the_whole_encoding(text, include_usage):
    chat = ChunkWriter(HEAD, CHAT, include_usage)
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}
    assert chat.chunk(choice) == full(CHAT, choice, include_usage)
    comp = ChunkWriter(HEAD, COMPLETION, include_usage)
    choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
    assert comp.chunk(choice) == full(COMPLETION, choice, include_usage)
    assert json.loads(chat.chunk({**choice, "delta": {"content": text}})[6:])


@pytest.mark.parametrize(
    "choice",
    [
        {"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None},
        {"index": 0, "delta": {"content": "a"}, "finish_reason": "stop", "logprobs": None},
        {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None},
        {"index": 0, "delta": {"content": None}, "finish_reason": None, "logprobs": None},
        {"index": 3, "delta": {"content": "a"}, "finish_reason": None, "logprobs": None},
        {
            "index": 0,
            "delta": {"content": "a"},
            "finish_reason": None,
            "logprobs": {"content": [], "refusal": None},
        },
        {
            "index": 0,
            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
            "finish_reason": None,
            "logprobs": None,
        },
    ],
)
def test_other_chunks_take_the_full_path(choice):
    w = ChunkWriter(HEAD, CHAT, True)
    assert w.chunk(choice) == full(CHAT, choice, True)


def test_usage_chunk():
    w = ChunkWriter(HEAD, CHAT, True)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    got = json.loads(w.usage(usage)[len(b"data: ") :])
    assert got == {**HEAD, "object": "chat.completion.chunk", "choices": [], "usage": usage}
    assert sse({"a": "\u00e9"}) == 'data: {"a":"\u00e9"}\n\n'.encode()
