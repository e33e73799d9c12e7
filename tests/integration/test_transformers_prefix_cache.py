"""The transformers engine's prompt cache on the tiny real HF model: reusing a cached prefix
changes no token (greedy and seeded sampling), the statistics move, the byte budget holds, and
requests or engines that opt out neither look up nor store."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import require

require("torch")
require("transformers")

from llmhost.engines.transformers import TransformersEngine  # noqa: E402
from llmhost.engines.transformers_batch import PromptCache  # noqa: E402
from llmhost.types import GenerationRequest, SamplingParams  # noqa: E402

SYSTEM = "System: You are a careful assistant who answers operators in short sentences.\n"
TURN1 = SYSTEM + "User: What is the capital of France?\nAssistant:"
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}


async def run(engine, prompt, *, cache_prompt: bool = True, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    sampling.setdefault("max_tokens", 12)
    ids: list[int] = []
    request = GenerationRequest(
        prompt=prompt, sampling=SamplingParams(**sampling), cache_prompt=cache_prompt
    )
    async for d in engine.stream(request):
        ids.extend(d.token_ids)
    return ids


@pytest.fixture
def make_engine(tiny_model, start_engine):
    async def make(**kw):
        kw.setdefault("threads", 2)
        return await start_engine(TransformersEngine(tiny_model.hf_dir, **kw))

    return make


@pytest.fixture
async def pair(make_engine):
    """The same model with the prompt cache on and off."""
    return await make_engine(parallel=4), await make_engine(parallel=4, prompt_cache=False)


def stats(engine) -> dict[str, float]:
    return engine.health().stats


async def settle(engine) -> None:
    """Rows leave the cache (and reach the prompt cache) at the scheduler's next step."""
    for _ in range(100):
        if stats(engine)["running"] == 0:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "seeded"])
async def test_multi_turn_reuses_the_first_turn(pair, sampling):
    on, off = pair
    turns: dict[str, list[list[int]]] = {}
    for name, e in (("on", on), ("off", off)):
        prompt = on.tokenize(TURN1)
        out = []
        for question in ("Why?", "And Germany?", "Thanks."):
            answer = await run(e, prompt, **sampling)
            out.append(answer)
            prompt = prompt + answer + e.tokenize(f"\nUser: {question}\nAssistant:", False)
        turns[name] = out
    assert turns["on"] == turns["off"]
    s = stats(on)
    assert s["prefix_cache_requests_hit"] == 2
    # turn 2 reuses all of turn 1 but the answer's last token, which was never fed
    assert s["prefix_cache_hits"] >= len(on.tokenize(TURN1)) + 11
    assert s["prefix_cache_queries"] > s["prefix_cache_hits"]
    assert 0 < s["prompt_cache_bytes"] <= s["prompt_cache_budget_bytes"]
    assert stats(off)["prefix_cache_queries"] == 0
    assert stats(off)["prompt_cache_bytes"] == 0


async def test_same_prompt_twice_and_diverging_at_the_last_token(pair):
    on, off = pair
    base = on.tokenize(TURN1)
    other_last = [*base[:-1], (base[-1] + 1) % 100]
    for prompt in (base, base, other_last, base[:-1], base + base[-3:]):
        for sampling in ({}, SAMPLED):
            assert await run(on, prompt, **sampling) == await run(off, prompt, **sampling)
    s = stats(on)
    assert s["prefix_cache_requests_hit"] >= 8
    # a repeated prompt still feeds its last token: never a whole prompt from the cache
    assert s["prefix_cache_hits"] <= s["prefix_cache_queries"] - 10


async def test_concurrent_requests_sharing_a_system_prompt(pair):
    on, off = pair
    questions = ["What is 2+2?", "Name a colour.", "Say hello.", "Count to three.", "Why?"]
    prompts = [on.tokenize(f"{SYSTEM}User: {q}\nAssistant:") for q in questions]
    lengths = [9, 14, 5, 11, 7]
    expected = [await run(off, p, max_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
    await run(on, on.tokenize(SYSTEM + "User: hi\nAssistant:"), max_tokens=3)
    await settle(on)
    for _ in range(2):  # the second round finds the first round's entries
        got = await asyncio.gather(
            *(run(on, p, max_tokens=n) for p, n in zip(prompts, lengths, strict=True))
        )
        assert list(got) == expected
        await settle(on)
    assert stats(on)["prefix_cache_requests_hit"] == 10


async def test_chunked_prefill_after_a_hit(make_engine):
    on = await make_engine(parallel=2, batch_size=8)
    off = await make_engine(parallel=2, batch_size=8, prompt_cache=False)
    prompt = on.tokenize(TURN1)
    longer = prompt + on.tokenize(" Paris is the capital. Tell me more about Paris please.", False)
    for p in (prompt, longer, longer[:-2]):
        assert await run(on, p, max_tokens=10) == await run(off, p, max_tokens=10)
    assert stats(on)["prefix_cache_requests_hit"] == 2


async def test_budget_zero_keeps_nothing(make_engine):
    e = await make_engine(prompt_cache_bytes=0)
    prompt = e.tokenize(TURN1)
    first = await run(e, prompt)
    assert await run(e, prompt) == first
    s = stats(e)
    assert s["prompt_cache_bytes"] == 0 and s["prompt_cache_budget_bytes"] == 0
    assert s["prefix_cache_hits"] == 0 and s["prefix_cache_requests_hit"] == 0
    assert s["prefix_cache_queries"] == 2 * len(prompt)


async def test_request_opt_out_neither_looks_up_nor_stores(make_engine):
    e = await make_engine()
    prompt = e.tokenize(TURN1)
    first = await run(e, prompt, cache_prompt=False)
    await settle(e)
    assert stats(e)["prompt_cache_bytes"] == 0
    assert await run(e, prompt) == first  # stores this one
    await settle(e)
    assert stats(e)["prompt_cache_bytes"] > 0
    assert await run(e, prompt, cache_prompt=False) == first
    s = stats(e)
    assert s["prefix_cache_queries"] == len(prompt)
    assert s["prefix_cache_hits"] == 0
    assert await run(e, prompt) == first
    assert stats(e)["prefix_cache_requests_hit"] == 1


async def test_cache_bytes_stay_within_a_small_budget(make_engine):
    probe = await make_engine(parallel=1)
    await run(probe, probe.tokenize(TURN1), max_tokens=4)
    await settle(probe)
    one = stats(probe)["prompt_cache_bytes"]
    assert one > 0
    budget = int(one * 2.5)
    e = await make_engine(parallel=2, prompt_cache_bytes=budget)
    for q in ("One?", "Two?", "Three?", "Four?", "Five?", "Six?"):
        await run(e, e.tokenize(f"{SYSTEM}User: {q}\nAssistant:"), max_tokens=4)
        await settle(e)
        s = stats(e)
        assert 0 < s["prompt_cache_bytes"] <= s["prompt_cache_budget_bytes"] == budget
    assert len(e._scheduler._prompt_cache.entries) <= 2


def test_prompt_cache_lru_rules():
    import torch

    def entry(n: int):
        from llmhost.engines.transformers_batch import CachedPrefix

        t = torch.zeros((1, 1, n, 1))
        return CachedPrefix([t], [t.clone()], 2 * t.numel() * t.element_size())

    pc = PromptCache(budget=8 * 10, max_entries=3)  # ten tokens' worth
    pc.put((1, 2, 3), entry(3))
    pc.put((1, 2, 3, 4), entry(4))  # supersedes its prefix
    assert list(pc.entries) == [(1, 2, 3, 4)]
    assert pc.covers((1, 2))
    pc.put((5, 6), entry(2))
    pc.put((7, 8), entry(2))
    assert pc.nbytes == 8 * 8
    n, _ = pc.longest([1, 2, 9])  # touches (1, 2, 3, 4)
    assert n == 2
    pc.put((9, 9), entry(2))  # past the entry cap: the least recently used (5, 6) goes
    assert list(pc.entries) == [(7, 8), (1, 2, 3, 4), (9, 9)]
    pc.put((3,) * 11, entry(11))  # larger than the whole budget: not kept
    assert (3,) * 11 not in pc.entries and pc.nbytes <= pc.budget
    assert pc.longest([4, 4]) == (0, None)
