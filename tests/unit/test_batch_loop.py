"""BatchLoop's scheduling without a model: a scripted backend records what the loop asks of it
(admissions, steps, releases, idling, shutdown) and samples tokens from a per-request script,
and the test lets the scheduler thread take one step at a time. Admission in arrival order up
to the free slots, the queue limit, the finish rules (budget, EOS, stop strings, a finished
grammar), cancellation of running and waiting requests, a failing step and shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from llmhost.engines.batching import BaseSequence, BatchLoop
from llmhost.errors import EngineError, Overloaded
from llmhost.types import SamplingParams, TokenDelta, TokenLogprob

EOS = 0
TEXT = {EOS: "<eos>", 1: "Hello", 2: " wor", 3: "ld", 4: "!", 5: " again"}


@dataclass(eq=False)
class Seq(BaseSequence):
    name: str = ""
    script: tuple[int, ...] = (1, 2, 3, 4, 5)  # what the "model" samples, in turn


class ScriptedLoop(BatchLoop):
    """Prefills each prompt `chunk` tokens a step, then decodes one token a step, sampling
    the next token of the sequence's script; records every call the loop makes. A step
    waits until the test allows it."""

    thread_name = "scripted-batch"

    def __init__(self, *, n_slots: int = 2, max_queue: int = 4, chunk: int = 4):
        super().__init__(n_slots=n_slots, max_queue=max_queue, log=logging.getLogger(__name__))
        self.chunk = chunk
        self.calls: list[tuple] = []
        self.fail_next = False
        self._gate = threading.Semaphore(0)
        self._stepped = threading.Condition()
        self.start()

    # --- driven from the test -------------------------------------------------------------

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._gate.release()

    def of(self, kind: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == kind]

    def wait_steps(self, n: int) -> None:
        with self._stepped:
            assert self._stepped.wait_for(lambda: self.steps >= n, timeout=5), self.calls

    # --- the backend ----------------------------------------------------------------------

    def _admit(self) -> None:
        admitted = []
        while self._waiting and self.free_slots() > 0:
            seq = self._waiting.popleft()
            self._active.append(seq)
            admitted.append(seq.name)
        if admitted:
            self.calls.append(("admit", *admitted))

    def _step(self) -> None:
        assert self._gate.acquire(timeout=5), "the test never allowed this step"
        if self.fail_next:
            raise RuntimeError("the device fell over")
        work = []
        for seq in list(self._active):
            if seq.prefilling:
                take = min(self.chunk, len(seq.prompt) - seq.n_fed)
                seq.n_fed += take
                work.append((seq.name, take))
                if seq.prefilling:
                    continue
            else:
                work.append((seq.name, 1))
            if seq.cancelled:  # cancelled while the step ran: its token is not wanted
                continue
            token = seq.script[seq.n_generated % len(seq.script)]
            lp = TokenLogprob(token, -0.5) if seq.sampling.logprobs is not None else None
            self._emit(seq, token, token == EOS, lp)
        self.calls.append(("step", *work))
        self._flush()
        with self._stepped:
            self.steps += 1
            self._stepped.notify_all()

    def _take(self, seq: Seq, token: int) -> str:
        return TEXT[token]

    def _tail(self, seq: Seq) -> str:
        return seq.stops.flush()

    def _release(self, seq: Seq) -> None:
        self.calls.append(("release", seq.name))

    def _idle(self) -> None:
        self.calls.append(("idle",))

    def _shutdown(self) -> None:
        self.calls.append(("shutdown", self._thread.is_alive()))

    def close(self) -> None:
        with self._cond:
            self._running = False
        self.allow(1000)  # a step waiting for the test must not hold up the join
        super().close()


@pytest.fixture
def make_loop():
    loops: list[ScriptedLoop] = []

    def make(**kw) -> ScriptedLoop:
        loops.append(ScriptedLoop(**kw))
        return loops[-1]

    yield make
    for loop in loops:
        loop.close()


def seq(name: str, prompt: int = 3, budget: int = 4, **kw) -> Seq:
    script = kw.pop("script", Seq.script)
    grammar = kw.pop("grammar", None)
    return Seq(
        prompt=list(range(100, 100 + prompt)),
        sampling=SamplingParams(**kw),
        budget=budget,
        loop=asyncio.get_running_loop(),
        queue=asyncio.Queue(),
        name=name,
        script=script,
        grammar=grammar,
    )


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [d async for d in stream]


def text(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


async def test_a_burst_is_admitted_in_arrival_order_up_to_the_free_slots(make_loop):
    loop = make_loop(n_slots=2, max_queue=4, chunk=4)
    a, b, c = seq("a", prompt=6, budget=2), seq("b", prompt=2, budget=3), seq("c", budget=1)
    streams = [asyncio.ensure_future(collect(loop.run(s, "busy"))) for s in (a, b, c)]
    await asyncio.sleep(0)  # all three submitted before the thread looks
    loop.allow(6)
    results = await asyncio.wait_for(asyncio.gather(*streams), timeout=5)
    assert loop.of("admit") == [("a", "b"), ("c",)]  # c only once a slot is free
    assert loop.of("step") == [
        (("a", 4), ("b", 2)),  # a's prompt in chunks; b's fits in one and samples at once
        (("a", 2), ("b", 1)),
        (("a", 1), ("b", 1)),  # a and b finish here
        (("c", 3),),
    ]
    assert loop.of("release") == [("a",), ("b",), ("c",)]
    assert [text(r) for r in results] == ["Hello wor", "Hello world", "Hello"]
    assert [r[-1].usage.completion_tokens for r in results] == [2, 3, 1]
    assert [r[-1].usage.prompt_tokens for r in results] == [6, 2, 3]
    assert all(d.usage is not None for r in results for d in r)  # usage on every delta
    assert loop.stats()["running"] == loop.stats()["waiting"] == 0


async def test_the_queue_holds_the_free_slots_plus_max_queue(make_loop):
    loop = make_loop(n_slots=1, max_queue=1)
    a, b, c = seq("a", budget=50), seq("b", budget=1), seq("c")
    first = loop.run(a, "busy")
    loop.allow(1)
    await anext(first)  # a runs
    assert loop.submit(b)  # one waits
    with pytest.raises(Overloaded, match="all busy") as exc:
        await anext(loop.run(c, "all busy"))
    assert exc.value.retry_after == 1
    assert loop.stats() | {"running": 1, "waiting": 1} == loop.stats()
    assert "c" not in {name for call in loop.of("admit") for name in call}


async def test_finish_rules(make_loop):
    loop = make_loop(n_slots=4)
    loop.allow(100)

    async def finish(s: Seq) -> tuple[str, str, int, tuple[int, ...]]:
        out = await collect(loop.run(s, "busy"))
        ids = tuple(t for d in out for t in d.token_ids)
        return text(out), out[-1].finish_reason, out[-1].usage.completion_tokens, ids

    # the budget: the last token comes with the finish
    assert await finish(seq("len", budget=3)) == ("Hello world", "length", 3, (1, 2, 3))
    # EOS ends it, not counted, not sent; unless ignored, when it is just a token
    assert await finish(seq("eos", script=(1, 2, EOS, 4))) == ("Hello wor", "stop", 2, (1, 2))
    loose = seq("ignore", script=(1, EOS, 4), ignore_eos=True, budget=3)
    assert await finish(loose) == ("Hello<eos>!", "length", 3, (1, EOS, 4))
    # a stop string across two tokens: nothing of it is sent, not even its first half
    cut = seq("stop", budget=10, stop=("world",))
    assert await finish(cut) == ("Hello ", "stop", 3, (1, 2, 3))
    # text held back as a possible stop string comes out when the budget ends instead
    held = seq("held", budget=2, stop=("wordy",))
    assert await finish(held) == ("Hello wor", "length", 2, (1, 2))
    # a budget of 0 (a prompt scored, nothing generated) ends before the first token
    assert await finish(seq("score", budget=0)) == ("", "length", 0, ())

    class Grammar:  # accepts two tokens, then the output is complete
        def __init__(self) -> None:
            self.seen: list[int] = []

        def advance(self, token: int) -> bool:
            self.seen.append(token)
            return len(self.seen) == 2

    g = Grammar()
    assert await finish(seq("json", budget=10, grammar=g)) == ("Hello wor", "stop", 2, (1, 2))
    assert g.seen == [1, 2]
    assert len(loop.of("release")) == 7  # every finished sequence is released once


async def test_logprobs_ride_with_their_tokens_and_prompt_logprobs_with_the_first(make_loop):
    loop = make_loop()
    s = seq("lp", budget=3, logprobs=0)
    s.prompt_lps = [TokenLogprob(100, None), TokenLogprob(101, -1.0)]
    loop.allow(10)
    out = await collect(loop.run(s, "busy"))
    assert [len(d.logprobs) for d in out] == [1, 1, 1]
    assert [d.logprobs[0].token for d in out] == [1, 2, 3]
    assert [len(d.prompt_logprobs) for d in out] == [2, 0, 0]


async def test_a_cancelled_running_sequence_leaves_at_the_next_reaping(make_loop):
    loop = make_loop(n_slots=2, chunk=8)
    a, b = seq("a", budget=100), seq("b", budget=3)
    stream = loop.run(a, "busy")
    first = asyncio.ensure_future(anext(stream))
    other = asyncio.ensure_future(collect(loop.run(b, "busy")))
    await asyncio.sleep(0)
    loop.allow(1)
    await first  # the client reads one token, then goes away
    await stream.aclose()
    assert a.cancelled
    loop.allow(10)
    assert text(await asyncio.wait_for(other, timeout=5)) == "Hello world"
    steps = loop.of("step")
    assert steps[0] == (("a", 3), ("b", 3))
    # a step already under way may still hold it (its token is dropped); none after that
    assert all(name == "b" for step in steps[2:] for name, _ in step)
    assert loop.of("release") == [("a",), ("b",)]  # a freed first, at the next reaping
    assert a.queue.empty()  # and nothing more was sent to it


async def test_a_request_cancelled_while_waiting_never_takes_a_slot(make_loop):
    loop = make_loop(n_slots=1)
    running = loop.run(seq("a", budget=100), "busy")
    loop.allow(1)
    await anext(running)
    waiting = asyncio.ensure_future(collect(loop.run(seq("b"), "busy")))
    await asyncio.sleep(0.01)
    assert loop.stats()["waiting"] == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await running.aclose()
    c = asyncio.ensure_future(collect(loop.run(seq("c", budget=1), "busy")))
    loop.allow(10)
    assert text(await asyncio.wait_for(c, timeout=5)) == "Hello"
    admitted = [name for call in loop.of("admit") for name in call]
    assert admitted == ["a", "c"]  # b was dropped from the queue, never admitted
    assert ("b",) not in loop.of("release")  # and holds nothing to free


async def test_idle_is_called_when_the_batch_empties(make_loop):
    loop = make_loop()
    loop.allow(10)
    await collect(loop.run(seq("a", budget=2), "busy"))
    await collect(loop.run(seq("b", budget=2), "busy"))
    kinds = [c[0] for c in loop.calls]
    # once before the first request, and once after each batch empties
    assert kinds.count("idle") >= 2
    assert kinds.index("idle") < kinds.index("admit")
    assert "idle" in kinds[kinds.index("release") :]


async def test_a_failing_step_fails_every_request_and_refuses_new_ones(make_loop, caplog):
    loop = make_loop(n_slots=1)
    running = loop.run(seq("a", budget=100), "busy")
    loop.allow(1)
    await anext(running)
    waiting = asyncio.ensure_future(anext(loop.run(seq("b"), "busy")))
    await asyncio.sleep(0.01)
    loop.fail_next = True
    loop.allow(1)
    with pytest.raises(EngineError, match="the device fell over"):
        await asyncio.wait_for(anext(running), timeout=5)
    with pytest.raises(EngineError, match="the device fell over"):
        await asyncio.wait_for(waiting, timeout=5)
    assert "batch scheduler stopped" in caplog.text
    await asyncio.to_thread(loop._thread.join, 5)
    assert not loop.alive()
    assert sorted(loop.of("release")) == [("a",), ("b",)]
    with pytest.raises(Overloaded):
        await anext(loop.run(seq("c"), "busy"))


async def test_close_fails_what_is_left_and_shuts_down_once(make_loop):
    loop = make_loop(n_slots=1)
    running = loop.run(seq("a", budget=100), "busy")
    loop.allow(1)
    await anext(running)
    waiting = asyncio.ensure_future(anext(loop.run(seq("b"), "busy")))
    await asyncio.sleep(0.01)
    await asyncio.to_thread(loop.close)
    with pytest.raises(EngineError, match="shut down"):
        await asyncio.wait_for(collect(running), timeout=5)  # a step may finish first
    with pytest.raises(EngineError, match="shut down"):
        await asyncio.wait_for(waiting, timeout=5)
    assert loop.of("shutdown") == [(False,)]  # after the thread has stopped
    assert not loop.submit(seq("c"))
