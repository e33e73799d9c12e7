"""The model-pool benchmark in smoke form (CI runs this; the full side-by-side run with
llama-server is by hand): embeddings, cold switch and isolation on tiny models, llmhost only,
every figure reported."""

from __future__ import annotations

from tests.conftest import require
from tests.e2e.benchmark_run import run_benchmark

require("llama_cpp")
require("transformers")


def test_model_pool_benchmark_smoke(tmp_path):
    env = {"LLMHOST_BENCH_CACHE": str(tmp_path)}
    out = run_benchmark("model_pool.py", "--smoke", "--no-llama-server", env=env)
    emb = out["embeddings"]
    assert emb["llmhost"]["concurrent_single_inputs_s"] > 0
    assert emb["transformers"]["engine_inputs_s"] > 0 and emb["transformers"]["naive_inputs_s"] > 0
    for cache in ("page_cache_warm", "page_cache_cold"):
        part = out["cold_switch"][cache]
        assert part["llmhost"] > 0 and "ratio" not in part and "llama_server" not in part
    assert out["isolation"]["loads_meanwhile"] >= 1
    assert out["targets"]["embeddings_ge_1x_llama_server"] is None  # not run
