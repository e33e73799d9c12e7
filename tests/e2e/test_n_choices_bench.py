"""The n-choices benchmark in smoke form (CI runs this; the side-by-side run with llama-server
is by hand): n=4 and n=1 answered in full on the demo model, and the ratio reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

require("llama_cpp")

ROOT = Path(__file__).resolve().parents[2]


def test_n_choices_benchmark_smoke(tmp_path):
    env = {**os.environ, "LLMHOST_BENCH_CACHE": str(tmp_path), "LLMHOST_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "n_choices.py"), "--smoke", "--no-llama-server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["wall_s"]["llmhost_n1"] > 0 and out["wall_s"]["llmhost_n"] > 0
    assert out["ratios"]["llmhost_n_vs_n1"] > 0
    assert out["ratios"]["llmhost_decode_n_vs_n1"] > 0
    assert "llama_server_n" not in out["wall_s"]  # not run
