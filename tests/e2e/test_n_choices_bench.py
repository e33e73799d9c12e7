"""The n-choices benchmark in smoke form (CI runs this; the side-by-side run with llama-server
is by hand): n=4 and n=1 answered in full on the demo model, and the ratio reported."""

from __future__ import annotations

from tests.conftest import require
from tests.e2e.benchmark_run import run_benchmark

require("llama_cpp")


def test_n_choices_benchmark_smoke(tmp_path):
    env = {"LLMHOST_BENCH_CACHE": str(tmp_path), "LLMHOST_HOME": str(tmp_path)}
    out = run_benchmark("n_choices.py", "--smoke", "--no-llama-server", env=env)
    assert out["wall_s"]["llmhost_n1"] > 0 and out["wall_s"]["llmhost_n"] > 0
    assert out["ratios"]["llmhost_n_vs_n1"] > 0
    assert out["ratios"]["llmhost_decode_n_vs_n1"] > 0
    assert "llama_server_n" not in out["wall_s"]  # not run
