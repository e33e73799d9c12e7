"""The prefix-cache benchmark in smoke form (CI runs this; the side-by-side run with
llama-server is by hand): llmhost with the cache on and off, both chat workloads and a short
soak, every request answered, and the cache within its budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

require("llama_cpp")

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_cache_benchmark_smoke(tmp_path):
    env = {**os.environ, "LLMHOST_BENCH_CACHE": str(tmp_path), "LLMHOST_HOME": str(tmp_path)}
    script = ROOT / "benchmarks" / "prefix_cache.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-llama-server", "--soak", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    mt, sp = out["multi_turn"], out["shared_prefix"]
    for side in (mt["llmhost"], mt["llmhost_cache_off"], sp["llmhost"], sp["llmhost_cache_off"]):
        assert side["failed"] == 0 and side["completed"] > 0
    assert len(mt["llmhost"]["ttft_p50_by_turn_ms"]) == 3
    assert out["soak"]["rounds"] >= 1 and out["soak"]["peak_cache_mib"] <= 1
    assert out["targets"]["soak_within_budget"] is True
    assert out["targets"]["multi_turn_ttft_p50_le_1x_llama_server"] is None  # not run
