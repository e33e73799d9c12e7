"""The model-pool benchmark in smoke form (CI runs this; the full side-by-side run with
llama-server is by hand): embeddings, cold switch and isolation on tiny models, llmhost only,
every figure reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

require("llama_cpp")
require("transformers")

ROOT = Path(__file__).resolve().parents[2]


def test_model_pool_benchmark_smoke(tmp_path):
    env = {**os.environ, "LLMHOST_BENCH_CACHE": str(tmp_path)}
    script = ROOT / "benchmarks" / "model_pool.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-llama-server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    emb = out["embeddings"]
    assert emb["llmhost"]["concurrent_single_inputs_s"] > 0
    assert emb["transformers"]["engine_inputs_s"] > 0 and emb["transformers"]["naive_inputs_s"] > 0
    for cache in ("page_cache_warm", "page_cache_cold"):
        part = out["cold_switch"][cache]
        assert part["llmhost"] > 0 and "ratio" not in part and "llama_server" not in part
    assert out["isolation"]["loads_meanwhile"] >= 1
    assert out["targets"]["embeddings_ge_1x_llama_server"] is None  # not run
