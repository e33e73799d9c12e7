"""Which prompt tokens a llama.cpp step takes: decoding sequences first, prompts shortest
remaining first in small chunks, and no prompt starves."""

from __future__ import annotations

from tests.conftest import require

require("llama_cpp")

from llmhost.engines.llamacpp_batch import (  # noqa: E402
    PREFILL_DECODING,
    PREFILL_FLOOR,
    Sequence,
    plan_prefill,
)
from llmhost.types import SamplingParams  # noqa: E402


def seq(slot: int, prompt: int, fed: int = 0) -> Sequence:
    s = Sequence(prompt=[1] * prompt, sampling=SamplingParams(), budget=8, loop=None, queue=None)
    s.slot, s.n_fed = slot, fed
    return s


def run_steps(active: list[Sequence], batch_size: int = 512) -> list[dict[int, int]]:
    """Plan and 'feed' steps until every prompt is in; the plans in order."""
    plans = []
    while any(s.prefilling for s in active):
        plan = plan_prefill(active, batch_size)
        assert plan, "a step with prompts waiting must take some"
        for s in active:
            s.n_fed += plan.get(s.slot, 0)
        plans.append(plan)
    return plans


def test_a_burst_gets_its_first_tokens_one_request_after_another():
    active = [seq(i, 125) for i in range(8)]
    plans = run_steps(active)
    assert [sorted(p) for p in plans] == [[i] for i in range(8)]  # one prompt a step


def test_short_prompts_share_a_step_up_to_the_floor():
    active = [seq(i, 40) for i in range(8)]
    plans = run_steps(active)
    assert all(sum(p.values()) == 2 * 40 for p in plans) and len(plans) == 4
    assert 2 * 40 >= PREFILL_FLOOR > 40


def test_a_long_prompt_alone_fills_the_batch():
    plans = run_steps([seq(0, 1300)], batch_size=512)
    assert [p[0] for p in plans] == [512, 512, 276]


def test_while_others_decode_a_step_takes_a_short_chunk():
    decoding = [seq(i, 10, fed=10) for i in range(7)]
    active = [*decoding, seq(7, 1000)]
    plan = plan_prefill(active, 512)
    assert plan == {7: PREFILL_DECODING}


def test_the_shortest_remaining_goes_first_but_a_long_one_is_not_starved():
    long = seq(0, 600)
    active = [long]
    fed_long_at = None
    for step in range(200):
        active.append(seq(100 + step, 70))  # a new short prompt every step
        plan = plan_prefill(active, 512)
        if 0 in plan:
            fed_long_at = step
            break
        for s in active:
            s.n_fed += plan.get(s.slot, 0)
        active = [s for s in active if s.prefilling]
    assert fed_long_at is not None and fed_long_at < 20
