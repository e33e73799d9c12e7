"""`llmhost bench` in smoke form against a live server: every figure present and sane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DIST = {"mean", "p50", "p90", "p99"}
FIELDS = {
    "completed",
    "failed",
    "errors",
    "duration_s",
    "prompt_tokens",
    "output_tokens",
    "request_throughput",
    "output_throughput",
    "goodput",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
}


def bench(*args: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def check(r: dict, n: int, out_tokens: int) -> None:
    assert set(r) >= FIELDS
    for d in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(r[d]) == DIST
        assert 0 <= r[d]["p50"] <= r[d]["p90"] <= r[d]["p99"]
    assert r["completed"] == n and r["failed"] == 0
    assert r["output_tokens"] == n * out_tokens
    assert r["output_throughput"] > 0 and r["request_throughput"] > 0
    assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]


def test_closed_and_open_loop(server):
    rep = bench(
        server.url,
        "--concurrency",
        "1,3",
        "--rate",
        "40",
        "--requests",
        "6",
        "--output-tokens",
        "12",
        "--prompt-tokens",
        "8",
        "--slo-ttft-ms",
        "100000",
    )
    names = [r["scenario"]["name"] for r in rep["results"]]
    assert names == ["c=1", "c=3", "rate=40/s"]
    for r in rep["results"]:
        check(r, 6, 12)
        assert r["goodput"] == pytest.approx(r["request_throughput"])  # SLO met by all
        assert r["model"] == "llmhost-demo"


def test_goodput_counts_only_requests_within_slo(server):
    rep = bench(
        server.url,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--output-tokens",
        "4",
        "--slo-ttft-ms",
        "0.0001",
    )
    assert rep["results"][0]["goodput"] == 0


def test_compare_mode_prints_ratios(server):
    rep = bench(
        "--compare",
        server.url,
        server.url,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--output-tokens",
        "6",
        "--rounds",
        "2",
    )
    r = rep["results"][0]
    check(r["a"], 8, 6)
    check(r["b"], 8, 6)
    assert set(r["ratio_a_over_b"]) >= {"output_throughput", "ttft_ms.p50", "tpot_ms.p50"}
    assert all(v > 0 for v in r["ratio_a_over_b"].values())


def test_bad_arguments_are_one_line_errors(server):
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "bench", server.url, "--concurrency", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "concurrency" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "bench", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "cannot list models" in p.stderr


def check_turns(r: dict, conversations: int, turns: int) -> None:
    by_turn = r["ttft_by_turn_ms"]
    assert [t["turn"] for t in by_turn] == list(range(1, turns + 1))
    assert all(t["n"] == conversations and 0 <= t["p50"] <= t["p90"] for t in by_turn)


def test_multi_turn_conversations(server):
    rep = bench(
        server.url,
        "--scenario",
        "multi-turn",
        "--conversations",
        "3",
        "--turns",
        "3",
        "--system-tokens",
        "64",
        "--prompt-tokens",
        "6",
        "--output-tokens",
        "5",
        "--seed",
        "7",
    )
    (r,) = rep["results"]
    assert r["scenario"]["kind"] == "multi-turn"
    check(r, 9, 5)
    check_turns(r, 3, 3)
    assert r["prompt_tokens"] > 9 * 64  # every turn resends the system prompt and history


def test_shared_prefix(server):
    rep = bench(
        server.url,
        "--scenario",
        "shared-prefix",
        "--concurrency",
        "3",
        "--requests",
        "6",
        "--system-tokens",
        "128",
        "--output-tokens",
        "4",
    )
    (r,) = rep["results"]
    assert r["scenario"]["name"] == "shared-prefix c=3"
    check(r, 6, 4)
    assert "ttft_by_turn_ms" not in r


def test_sharegpt_replay(server, tmp_path):
    turn = [{"from": "human", "value": "Tell me about rivers."}, {"from": "gpt", "value": "Wet."}]
    data = [
        {"conversations": [{"from": "system", "value": "Be brief."}, *turn * 3]},
        {"conversations": "malformed"},
        {"conversations": turn * 2},
        {"conversations": turn},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    for extra in ([], ["--sharegpt-use-file-answers"]):
        rep = bench(
            server.url,
            "--sharegpt",
            str(path),
            "--conversations",
            "2",
            "--turns",
            "2",
            "--output-tokens",
            "4",
            *extra,
        )
        (r,) = rep["results"]
        assert r["scenario"]["sharegpt_skipped"] == 1
        check(r, 4, 4)
        check_turns(r, 2, 2)


def test_no_cache_prompt_is_sent_only_when_asked(server):
    # llmhost refuses unknown fields; this server either knows cache_prompt or names it
    p = subprocess.run(
        [
            *(sys.executable, "-m", "llmhost", "bench", server.url, "--concurrency", "1"),
            *("--requests", "1", "--output-tokens", "2", "--no-cache-prompt", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)["results"][0]
    assert r["completed"] == 1 or any("cache_prompt" in e for e in r["errors"])
