"""The download benchmark in its smoke form: nginx throttled per connection, llmhost pull vs
aria2c, one JSON line with every figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]


def test_pull_benchmark_smoke(tmp_path):
    missing = [t for t in ("aria2c", "curl", "bc") if shutil.which(t) is None] + (
        [] if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx") else ["nginx"]
    )
    if missing:
        if IN_CI:
            pytest.fail(f"{', '.join(missing)} required in CI but missing")
        pytest.skip(f"needs {', '.join(missing)}")
    env = {
        **os.environ,
        "SIZE_MB": "16",
        "RATE": "4m",
        "ROUNDS": "1",
        "SINGLE": "1",
        "LLMHOST_BENCH_CACHE": str(tmp_path),
    }
    p = subprocess.run(
        [str(ROOT / "benchmarks" / "pull_vs_aria2.sh")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("llmhost_x8_s", "llmhost_x16_s", "aria2c_x16_s", "single_stream_s"):
        assert out[key] > 0, out
    assert out["bytes"] == 16 << 20
    # even at this size, parallel streams beat one throttled stream
    assert out["speedup_llmhost_x16_vs_single"] > 1.5, out
