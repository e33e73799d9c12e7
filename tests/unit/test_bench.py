"""`llmhost bench` workloads: conversation building, ShareGPT parsing, the request bodies."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from llmhost.errors import ConfigError
from llmhost.ops.bench import (
    Bench,
    BenchConfig,
    Conversation,
    Scenario,
    build_conversations,
    load_sharegpt,
    parse_sharegpt,
    summarize,
)


def test_conversations_share_one_system_prompt_and_are_deterministic():
    a = build_conversations(3, 4, 50, 8, seed="s")
    assert len(a) == 3 and all(len(c.users) == 4 for c in a)
    assert len({c.system for c in a}) == 1 and len(a[0].system.split()) == 50
    assert len({u for c in a for u in c.users}) == 12  # every user message distinct
    assert build_conversations(3, 4, 50, 8, seed="s") == a
    assert build_conversations(3, 4, 50, 8, seed="t")[0].system != a[0].system


def test_each_turn_appends_the_previous_answer_and_a_new_user_message():
    conv = Conversation("SYS", ["u1", "u2", "u3"])
    assert conv.messages(0, []) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "u1"},
    ]
    msgs = conv.messages(2, ["a1", "a2"])
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("system", "SYS"),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
        ("user", "u3"),
    ]
    # answers from a file replace the generated ones; no system message when empty
    filed = Conversation("", ["u1", "u2"], ["f1", "f2"])
    assert [m["content"] for m in filed.messages(1, ["gen"])] == ["u1", "f1", "u2"]


GOOD = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
        {"from": "human", "value": "q3"},
    ]
}


def test_sharegpt_parsing_skips_and_counts_malformed_records():
    data = [
        GOOD,
        "not a record",
        {"id": "no conversations"},
        {"conversations": []},
        {"conversations": [{"from": "human"}]},  # no value
        {"conversations": [{"from": "robot", "value": "x"}]},  # unknown role
        {"conversations": [{"from": "gpt", "value": "only an answer"}]},
        {"conversations": [{"from": "human", "value": "   "}]},  # empty user turn
        {
            "conversations": [
                {"from": "gpt", "value": "greeting"},  # dropped
                {"from": "human", "value": "x"},
                {"from": "human", "value": "y"},  # joined with x
                {"from": "gpt", "value": "z"},
            ]
        },
    ]
    convs, skipped = parse_sharegpt(data, max_conversations=10, max_turns=10)
    assert skipped == 7 and len(convs) == 2
    assert convs[0] == Conversation("be brief", ["q1", "q2", "q3"], ["a1", "a2", ""])
    assert convs[1] == Conversation("", ["x\ny"], ["z"])
    # bounds on conversations and turns
    convs, skipped = parse_sharegpt(data, max_conversations=1, max_turns=2)
    assert len(convs) == 1 and skipped == 0 and convs[0].users == ["q1", "q2"]
    assert convs[0].answers == ["a1", "a2"]
    with pytest.raises(ConfigError):
        parse_sharegpt({"conversations": []}, 1, 1)


def test_sharegpt_file_limits(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([GOOD, 3]))
    convs, skipped = load_sharegpt(p, 8, 6)
    assert len(convs) == 1 and skipped == 1
    with pytest.raises(ConfigError, match="more than"):
        load_sharegpt(p, 8, 6, max_bytes=10)
    p.write_text("[{")
    with pytest.raises(ConfigError, match="JSON"):
        load_sharegpt(p, 8, 6)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="no usable conversation"):
        load_sharegpt(p, 8, 6)
    with pytest.raises(ConfigError):
        load_sharegpt(tmp_path / "missing.json", 8, 6)


def _fake_server(bodies: list[dict]):
    """A streaming chat server: answers `ans<n>` in two pieces, n counting requests."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        n = len(bodies)
        chunks = [
            {"choices": [{"delta": {"role": "assistant"}}]},
            {"choices": [{"delta": {"content": "ans"}}]},
            {"choices": [{"delta": {"content": str(n)}}]},
            {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
        ]
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def _run(cfg: BenchConfig, sc: Scenario, bodies: list[dict]):
    async def go():
        bench = Bench(cfg)
        await bench.client.aclose()
        bench.client = httpx.AsyncClient(transport=_fake_server(bodies))
        try:
            return await bench.run(sc)
        finally:
            await bench.client.aclose()

    return asyncio.run(go())


def test_multi_turn_sends_the_streamed_answers_back():
    bodies: list[dict] = []
    cfg = BenchConfig(url="http://x", model="m", output_tokens=2, system_tokens=5, nonce="n")
    sc = Scenario(name="mt", kind="multi-turn", conversations=1, turns=3)
    results, duration = _run(cfg, sc, bodies)
    assert [r.turn for r in results] == [1, 2, 3] and all(r.ok for r in results)
    assert [r.text for r in results] == ["ans1", "ans2", "ans3"]
    last = bodies[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["ans1", "ans2"]
    assert all(b["ignore_eos"] and b["max_tokens"] == 2 for b in bodies)
    assert all("cache_prompt" not in b for b in bodies)  # sent only when turned off
    rep = summarize(results, duration, cfg)
    assert [t["turn"] for t in rep["ttft_by_turn_ms"]] == [1, 2, 3]
    assert all(t["n"] == 1 and t["p50"] <= t["p90"] for t in rep["ttft_by_turn_ms"])


def test_no_cache_prompt_and_shared_prefix():
    bodies: list[dict] = []
    cfg = BenchConfig(url="http://x", model="m", system_tokens=20, cache_prompt=False, nonce="n")
    sc = Scenario(name="sp", kind="shared-prefix", concurrency=2, requests=4)
    results, duration = _run(cfg, sc, bodies)
    assert len(results) == 4 and all(r.ok and r.turn is None for r in results)
    assert all(b["cache_prompt"] is False for b in bodies)
    assert len({b["messages"][0]["content"] for b in bodies}) == 1  # one system prompt
    assert len({b["messages"][1]["content"] for b in bodies}) == 4  # distinct questions
    assert "ttft_by_turn_ms" not in summarize(results, duration, cfg)


def test_sharegpt_replay_with_file_answers(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([GOOD, {"bad": 1}, GOOD]))
    bodies: list[dict] = []
    cfg = BenchConfig(url="http://x", model="m", nonce="n")
    sc = Scenario(
        name="sg", kind="sharegpt", conversations=1, turns=2, sharegpt=str(p), use_file_answers=True
    )
    results, _ = _run(cfg, sc, bodies)
    assert [r.turn for r in results] == [1, 2]
    assert [m["content"] for m in bodies[-1]["messages"]] == ["be brief", "q1", "a1", "q2"]
