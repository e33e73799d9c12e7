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
