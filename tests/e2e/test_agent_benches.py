"""The constrained-decoding and tool-call benchmarks in smoke form (CI runs these; the full runs
are by hand): each prints its JSON line with sane figures, and llmhost answers every tool-call
and schema case right or is cut by max_tokens, never wrong."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import require
from tests.e2e.benchmark_run import run_benchmark

require("llama_cpp")
require("openai")


def _run(tmp_path: Path, script: str, *args: str) -> dict:
    env = {"LLMHOST_BENCH_CACHE": str(tmp_path), "LLMHOST_HOME": str(tmp_path)}
    return run_benchmark(script, *args, env=env)


def test_constrained_decoding_smoke(tmp_path):
    out = _run(tmp_path, "constrained_decoding.py", "--smoke")
    assert out["schema_fields"] == 20
    assert out["compile_ms"]["first"] < 50 and out["compile_ms"]["cached"] < 1
    for key in ("c1_tok_s", "c8_tok_s"):
        fig = out[key]
        # the ratio is about 0.8 on a quiet machine; other jobs on the cores can halve it
        assert fig["constrained"] > 0 and fig["unconstrained"] > 0 and fig["ratio"] > 0.15


def test_agents_benchmark_smoke_llmhost(tmp_path):
    out = _run(tmp_path, "agents_vs_llama_server.py", "--smoke", "--servers", "llmhost")
    results = out["results"]["llmhost"]
    assert len(results) == 12
    for case, r in results.items():
        assert r["failed"] == 0, (case, r["failures"])
        assert r["passed"] + r["length_cuts"] == r["n"] == 1, case
    assert all(results[k]["passed"] == 1 for k in results if k.startswith("8"))
