"""The prefix-cache benchmark in smoke form (CI runs this; the side-by-side run with
llama-server is by hand): llmhost with the cache on and off, both chat workloads and a short
soak, every request answered, and the cache within its budget."""

from __future__ import annotations

from tests.conftest import require
from tests.e2e.benchmark_run import run_benchmark

require("llama_cpp")


def test_prefix_cache_benchmark_smoke(tmp_path):
    env = {"LLMHOST_BENCH_CACHE": str(tmp_path), "LLMHOST_HOME": str(tmp_path)}
    out = run_benchmark("prefix_cache.py", "--smoke", "--no-llama-server", "--soak", "5", env=env)
    mt, sp = out["multi_turn"], out["shared_prefix"]
    for side in (mt["llmhost"], mt["llmhost_cache_off"], sp["llmhost"], sp["llmhost_cache_off"]):
        assert side["failed"] == 0 and side["completed"] > 0
    assert len(mt["llmhost"]["ttft_p50_by_turn_ms"]) == 3
    assert out["soak"]["rounds"] >= 1 and out["soak"]["peak_cache_mib"] <= 1
    assert out["targets"]["soak_within_budget"] is True
    assert out["targets"]["multi_turn_ttft_p50_le_1x_llama_server"] is None  # not run
