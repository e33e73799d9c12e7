"""Log-probability arithmetic and shapes, and the choices runner, without a model."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from llmhost.api.choices import Choice, Choices, total_usage
from llmhost.api.logprobs import FLOOR, LogprobShaper, token_text
from llmhost.engines.logprobs import log_softmax, token_logprob
from llmhost.errors import InvalidRequest
from llmhost.types import GenerationRequest, TokenDelta, TokenLogprob, Usage


def test_log_softmax_sums_to_one_and_keeps_masked_tokens_impossible():
    row = np.array([2.0, 1.0, -np.inf, 0.5, 30.0], dtype=np.float32)
    lp = log_softmax(row)
    assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-6)
    assert lp[2] == -np.inf and lp[4] == pytest.approx(0.0, abs=1e-6)
    big = log_softmax(np.array([1e4, 1e4 - 1], dtype=np.float32))  # no overflow
    assert big[0] == pytest.approx(-math.log1p(math.exp(-1)), abs=1e-6)


def test_token_logprob_takes_the_top_k_likeliest_first_ties_by_id():
    lp = log_softmax(np.array([0.0, 3.0, 1.0, 3.0, -1.0], dtype=np.float32))
    entry = token_logprob(lp, 2, 3)
    assert entry.token == 2 and entry.logprob == pytest.approx(float(lp[2]))
    assert [t for t, _ in entry.top] == [1, 3, 2]
    assert token_logprob(lp, 0, 0).top == ()
    assert len(token_logprob(lp, 0, 50).top) == 5


def test_token_text_shows_partial_characters_as_bytes():
    assert token_text("é".encode()) == "é"
    assert token_text(b"\xc3") == "bytes:\\xc3"
    assert token_text(b"") == ""


PIECES = {1: b"He", 2: b"llo", 3: b"\xe2\x82", 4: b"\xac"}


def test_chat_shape():
    s = LogprobShaper(PIECES.__getitem__, chat=True)
    out = s.shape([TokenLogprob(1, -0.5, ((1, -0.5), (2, -float("inf"))))])
    (entry,) = out["content"]
    assert entry == {
        "token": "He",
        "logprob": -0.5,
        "bytes": [72, 101],
        "top_logprobs": [
            {"token": "He", "logprob": -0.5, "bytes": [72, 101]},
            {"token": "llo", "logprob": FLOOR, "bytes": [108, 108, 111]},
        ],
    }
    assert out["refusal"] is None


def test_completion_shape_offsets_run_across_chunks():
    s = LogprobShaper(PIECES.__getitem__, chat=False)
    a = s.shape([TokenLogprob(1, None), TokenLogprob(2, -1.0, ((2, -1.0), (1, -2.0)))])
    b = s.shape([TokenLogprob(3, -0.1, ()), TokenLogprob(4, -0.2, ())])
    assert a["tokens"] == ["He", "llo"] and a["token_logprobs"] == [None, -1.0]
    assert a["top_logprobs"] == [None, {"llo": -1.0, "He": -2.0}]
    assert a["text_offset"] == [0, 2]
    assert b["tokens"] == ["bytes:\\xe2\\x82", "bytes:\\xac"] and b["text_offset"][0] == 5
    merged = s.merge([a, b])
    assert merged["tokens"] == a["tokens"] + b["tokens"]
    assert s.merge([]) is None


class Scripted:
    """Starts streams of `length` deltas; records how many run at once."""

    def __init__(self, length: int, fail_group: int | None = None):
        self.length, self.fail_group = length, fail_group
        self.running = self.peak = 0

    async def start(self, gen: GenerationRequest):
        """As the serving layer starts an engine stream: up to its first delta."""
        stream = self.stream(gen)
        return await anext(stream), stream

    async def stream(self, gen: GenerationRequest):
        if gen.prompt == f"p{self.fail_group}":
            raise InvalidRequest("bad prompt", param="prompt")
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for i in range(self.length):
                await asyncio.sleep(0.001)
                yield TokenDelta(
                    text=f"{gen.prompt}.{i}",
                    token_ids=(i,),
                    usage=Usage(3, i + 1),
                    finish_reason="length" if i == self.length - 1 else None,
                )
        finally:
            self.running -= 1


def choices(groups: int, n: int) -> list[Choice]:
    out = []
    for g in range(groups):
        for _ in range(n):
            gen = GenerationRequest(prompt=f"p{g}")
            out.append(Choice(index=len(out), group=g, gen=gen, shaper=None))
    return out


async def test_groups_run_in_waves_and_every_delta_arrives():
    engine = Scripted(length=4)
    cs = choices(groups=5, n=2)
    run = Choices(cs, engine.start, width=2)
    await run.open()
    seen: dict[int, list[str]] = {}
    async for c, d in run.deltas():
        seen.setdefault(c.index, []).append(d.text)
    await run.aclose()
    assert engine.peak <= 4  # two groups of two at a time
    assert sorted(seen) == list(range(10))
    for c in cs:
        assert seen[c.index] == [f"p{c.group}.{i}" for i in range(4)]
    assert total_usage(cs) == Usage(5 * 3, 10 * 4)  # prompts once, completions all


async def test_an_error_in_the_first_wave_is_raised_before_any_output():
    run = Choices(choices(groups=2, n=2), Scripted(4, fail_group=1).start, width=2)
    with pytest.raises(InvalidRequest):
        await run.open()


async def test_a_later_groups_error_comes_in_band_and_nothing_is_left_running():
    engine = Scripted(length=3, fail_group=2)
    run = Choices(choices(groups=3, n=1), engine.start, width=1)
    await run.open()
    got = []
    with pytest.raises(InvalidRequest):
        async for c, _ in run.deltas():
            got.append(c.group)
    await run.aclose()
    assert got == [0, 0, 0, 1, 1, 1] and engine.running == 0


async def test_closing_early_closes_every_stream():
    engine = Scripted(length=50)
    run = Choices(choices(groups=1, n=4), engine.start, width=1)
    await run.open()
    async for _ in run.deltas():
        break
    await run.aclose()
    assert engine.running == 0
