"""What every in-process chat engine does the same way, checked once through the Engine
interface on each (fake, llama.cpp, transformers): streaming and usage, determinism and seeds,
batching that changes no output, stop strings, EOS, cancellation, the wait queue's limit and
requests refused before their first delta. What an engine lacks is declared in conftest.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from llmhost.errors import ContextLengthExceeded, EngineNotReady, InvalidRequest, Overloaded
from llmhost.types import GenerationRequest, SamplingParams, Usage

PROMPTS = [
    "The quick brown fox",
    "Operators care about the first token and",
    "A",
    "Models are large files and downloads fail. A careful downloader fetches several ranges",
    "def handler(request):",
    "User: What is the capital of France?\nAssistant:",
]


@dataclass
class Result:
    text: str
    ids: list[int]
    finish: str | None
    usage: Usage | None
    deltas: int


def request(prompt: str | list[int], **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(**sampling))


async def run(engine, prompt: str | list[int], **sampling) -> Result:
    out = Result("", [], None, None, 0)
    async for d in engine.stream(request(prompt, **sampling)):
        assert out.finish is None, "a delta after the finishing one"
        assert len(d.token_ids) <= 1, "one token per delta"
        out.text += d.text
        out.ids.extend(d.token_ids)
        out.finish, out.usage = d.finish_reason, d.usage
        out.deltas += 1
    return out


async def settled(kind, engine) -> int:
    """Streams still running once a cancellation has had time to reach the engine."""
    for _ in range(200):
        if kind.running(engine) == 0:
            break
        await asyncio.sleep(0.01)
    return kind.running(engine)


async def test_streams_tokens_with_usage_and_a_finish_reason(kind, make_engine):
    e = await make_engine()
    assert e.health().ok
    assert e.model_info.context_length == 256
    r = await run(e, PROMPTS[1], max_tokens=12)
    assert r.finish == "length"
    assert len(r.ids) == r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(e.tokenize(PROMPTS[1]))
    assert (await run(e, PROMPTS[1], max_tokens=12)).ids == r.ids  # greedy is deterministic
    ids = await run(e, [5, 10, 20], max_tokens=3)  # a prompt of token ids
    assert ids.usage.prompt_tokens == 3 and len(ids.ids) == 3
    assert kind.running(e) == 0


@pytest.mark.behaviour("sampling")
async def test_seeded_sampling_is_reproducible(make_engine):
    e = await make_engine()
    sampled = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "seed": 42}
    a = await run(e, PROMPTS[0], **sampled)
    b = await run(e, PROMPTS[0], **sampled)
    c = await run(e, PROMPTS[0], **{**sampled, "seed": 43})
    assert a.ids == b.ids
    assert a.ids != c.ids
    greedy = await run(e, PROMPTS[0], max_tokens=16)
    top1 = await run(e, PROMPTS[0], max_tokens=16, temperature=1.0, top_k=1, seed=5)
    assert top1.ids == greedy.ids  # top_k=1 is greedy whatever the seed


async def test_batched_requests_match_their_solo_runs(kind, make_engine):
    # More requests than slots, greedy and seeded, and a prompt longer than the batch (fed
    # in chunks while the others decode): together each gives what it gives alone.
    e = await make_engine(parallel=4, batch_size=16)
    long = PROMPTS[3] * 2
    assert len(e.tokenize(long)) > 16
    lengths = [12, 30, 7, 18, 25, 9, 14]
    jobs = [(p, {"max_tokens": n}) for p, n in zip([*PROMPTS, long], lengths, strict=True)]
    jobs.append((PROMPTS[0], {"max_tokens": 16, "temperature": 0.9, "top_k": 40, "seed": 7}))
    solo = [(await run(e, p, **kw)).ids for p, kw in jobs]
    together = await asyncio.gather(*(run(e, p, **kw) for p, kw in jobs))
    assert [r.ids for r in together] == solo
    assert [r.usage.completion_tokens for r in together] == [kw["max_tokens"] for _, kw in jobs]
    assert kind.running(e) == 0


async def test_chunked_prefill_gives_the_tokens_of_a_whole_one(make_engine):
    whole = await make_engine(parallel=1, ctx_size=512, batch_size=512)
    chunked = await make_engine(parallel=1, ctx_size=512, batch_size=16)
    prompt = " ".join(PROMPTS) * 2
    assert len(whole.tokenize(prompt)) > 3 * 16
    assert (await run(whole, prompt, max_tokens=10)).ids == (
        await run(chunked, prompt, max_tokens=10)
    ).ids


async def test_neighbours_leaving_mid_batch_change_nothing(kind, make_engine):
    # Streams cancelled mid-decode and mid-prefill, and an early finisher, leave the batch
    # while one sequence runs on: it gives what it gives alone.
    e = await make_engine(parallel=4, batch_size=16)
    solo = [(await run(e, p, max_tokens=n)).ids for p, n in ((PROMPTS[0], 24), (PROMPTS[4], 3))]

    async def abandon(prompt: str, after: int) -> None:
        agen = e.stream(request(prompt, max_tokens=100, seed=1))
        for _ in range(after):
            await anext(agen)
        await agen.aclose()

    results = await asyncio.gather(
        run(e, PROMPTS[0], max_tokens=24),
        abandon(PROMPTS[1], 4),
        run(e, PROMPTS[4], max_tokens=3),
        abandon(PROMPTS[3] * 2, 1),
    )
    assert [results[0].ids, results[2].ids] == solo
    assert await settled(kind, e) == 0


async def test_stop_string_cuts_the_text(make_engine):
    e = await make_engine()
    full = await run(e, PROMPTS[0], max_tokens=24)
    stop = full.text[5:8]
    assert len(stop) == 3
    r = await run(e, PROMPTS[0], max_tokens=24, stop=("never there", stop))
    assert r.finish == "stop"
    assert r.text == full.text[: full.text.index(stop)]
    assert r.usage.completion_tokens < 24


async def test_eos_ends_the_stream_unless_ignored(make_engine):
    e = await make_engine()
    # A negative presence penalty is a bonus for tokens already seen: with EOS as the prompt
    # and a huge bonus, greedy picks EOS at once. (The fake's EOS is scripted to come first.)
    eos = e.tokenize(e.eos_token, add_special=False) if e.eos_token else []
    prompt = eos or "x"
    stopped = await run(e, prompt, max_tokens=8, ignore_eos=False, presence_penalty=-1e4)
    assert (stopped.ids, stopped.finish, stopped.usage.completion_tokens) == ([], "stop", 0)
    ignored = await run(e, prompt, max_tokens=8, ignore_eos=True, presence_penalty=-1e4)
    assert ignored.finish == "length" and len(ignored.ids) == 8
    assert not set(eos) & set(ignored.ids)


async def in_flight(kind, engine, n: int) -> None:
    """Wait until `n` streams are running or waiting for a slot."""
    for _ in range(2000):
        if kind.running(engine) + engine.health().stats.get("waiting", 0) >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{n} streams never got to the engine")


async def test_cancelling_frees_the_slot(kind, make_engine):
    e = await make_engine(parallel=1, max_queue=4, ctx_size=2048)
    agen = e.stream(request("hello", max_tokens=2000))
    await anext(agen)
    await anext(agen)
    assert kind.running(e) == 1
    await agen.aclose()  # the client goes away mid-stream
    assert await settled(kind, e) == 0
    r = await asyncio.wait_for(run(e, "next", max_tokens=5), timeout=10)
    assert r.finish == "length" and len(r.ids) == 5


@pytest.mark.behaviour("cancel_in_prefill")
async def test_cancelling_the_task_as_its_stream_starts(kind, make_engine):
    e = await make_engine(parallel=1, max_queue=4, ctx_size=2048)
    task = asyncio.create_task(run(e, "hello", max_tokens=2000))
    await in_flight(kind, e, 1)
    task.cancel()  # lands while the prompt is prefilled, or soon after
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await settled(kind, e) == 0
    r = await asyncio.wait_for(run(e, "next", max_tokens=5), timeout=10)
    assert r.finish == "length" and len(r.ids) == 5


async def test_cancelling_a_request_still_waiting(kind, make_engine):
    e = await make_engine(parallel=1, max_queue=4, ctx_size=2048)
    first = e.stream(request("first", max_tokens=2000))
    await anext(first)
    waiting = asyncio.create_task(run(e, "second", max_tokens=2000))
    await in_flight(kind, e, 2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await first.aclose()
    assert await settled(kind, e) == 0
    assert e.health().stats.get("waiting", 0) == 0
    assert len((await run(e, "third", max_tokens=4)).ids) == 4


@pytest.mark.behaviour("queue")
async def test_a_full_queue_is_overloaded(make_engine):
    e = await make_engine(parallel=1, max_queue=1, ctx_size=2048)
    running = e.stream(request("a", max_tokens=1000))
    queued = e.stream(request("b", max_tokens=1000))
    try:
        await anext(running)
        waiting = asyncio.create_task(anext(queued))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as exc:
            await anext(e.stream(request("c", max_tokens=2)))
        assert exc.value.status_code == 503 and exc.value.retry_after
        await running.aclose()
        await asyncio.wait_for(waiting, timeout=10)  # the waiting one gets the freed slot
    finally:
        await running.aclose()
        await queued.aclose()


async def test_bad_requests_fail_before_the_first_delta(kind, make_engine):
    e = await make_engine(parallel=1, ctx_size=256)
    n_ctx = e.model_info.context_length
    assert n_ctx == 256
    for prompt, max_tokens, param in (
        ("word " * 300, 1, "prompt"),
        ([], 1, "prompt"),
        ("hi", n_ctx, "max_tokens"),
    ):
        with pytest.raises(ContextLengthExceeded) as exc:
            await anext(e.stream(request(prompt, max_tokens=max_tokens)))
        assert exc.value.param == param
    # no max_tokens: the rest of the context
    r = await run(e, "hi", max_tokens=None)
    assert r.finish == "length" and r.usage.total_tokens == n_ctx
    assert kind.running(e) == 0


@pytest.mark.behaviour("vocabulary")
async def test_token_ids_outside_the_vocabulary_are_refused(make_engine):
    e = await make_engine()
    with pytest.raises(InvalidRequest, match="vocabulary") as exc:
        await anext(e.stream(request([1, 2, 10**6], max_tokens=2)))
    assert exc.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="vocabulary") as exc:
        await anext(e.stream(request("hi", max_tokens=2, logit_bias=((10**6, 1.0),))))
    assert exc.value.param == "logit_bias"


async def test_not_ready_before_start_and_after_close(kind, tiny_model, make_engine):
    cold = kind.build(tiny_model, parallel=1, max_queue=1, ctx_size=64, batch_size=16)
    with pytest.raises(EngineNotReady):
        await anext(cold.stream(request("hi", max_tokens=2)))
    e = await make_engine(parallel=1, ctx_size=64)
    await e.close()
    assert not e.health().ok
    with pytest.raises(EngineNotReady):
        await anext(e.stream(request("hi", max_tokens=2)))
