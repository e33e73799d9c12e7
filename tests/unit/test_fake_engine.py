import asyncio

import pytest

from llmhost.engines.fake import FakeEngine
from llmhost.errors import ContextLengthExceeded, EngineNotReady
from llmhost.types import GenerationRequest, SamplingParams


async def collect(engine, **sampling):
    out = []
    async for d in engine.stream(
        GenerationRequest(prompt="a b c", sampling=SamplingParams(**sampling))
    ):
        out.append(d)
    return out


async def test_scripted_tokens_and_usage():
    e = FakeEngine(script=["x", "y"])
    await e.start()
    out = await collect(e, max_tokens=5)
    assert "".join(d.text for d in out) == "xyxyx"
    assert out[-1].finish_reason == "length"
    assert out[-1].usage.prompt_tokens == 3 and out[-1].usage.completion_tokens == 5
    assert e.requests[0].sampling.max_tokens == 5


async def test_stop_and_eos():
    e = FakeEngine(script=["a", "b", "c"], eos_after=2)
    await e.start()
    out = await collect(e, max_tokens=10)
    assert out[-1].finish_reason == "stop" and out[-1].usage.completion_tokens == 2
    out = await collect(e, max_tokens=4, ignore_eos=True)
    assert out[-1].usage.completion_tokens == 4
    e2 = FakeEngine(script=["a", "b", "c"])
    await e2.start()
    out = await collect(e2, max_tokens=10, stop=("c",))
    assert "".join(d.text for d in out) == "ab" and out[-1].finish_reason == "stop"


async def test_not_started_and_context():
    e = FakeEngine(context_length=4)
    with pytest.raises(EngineNotReady):
        await collect(e)
    await e.start()
    with pytest.raises(ContextLengthExceeded):
        await collect(e, max_tokens=2)


async def test_cancellation_is_counted_and_frees():
    e = FakeEngine(token_delay=0.01)
    await e.start()
    agen = e.stream(GenerationRequest(prompt="a", sampling=SamplingParams(max_tokens=100)))
    await anext(agen)
    assert e.active == 1
    await agen.aclose()
    assert e.active == 0 and e.cancelled == 1

    async def consume():
        async for _ in e.stream(
            GenerationRequest(prompt="a", sampling=SamplingParams(max_tokens=100))
        ):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert e.active == 0 and e.cancelled == 2
