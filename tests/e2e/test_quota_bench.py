"""The quota overhead benchmark in smoke form (the full run is by hand): every figure is
reported, in memory and through a real Redis, in process and through a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require, require_exe

ROOT = Path(__file__).resolve().parents[2]


def test_quota_overhead_benchmark_smoke():
    require_exe("redis-server", "redis-server")
    require("redis")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quota_overhead.py"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["offered_rate"] == 200
    for part in ("in_process_memory", "in_process_redis", "rate_limits_in_process_redis"):
        fig = out[part]
        assert 0 < fig["admit_p50_us"] <= fig["admit_p99_us"], part
        assert fig["charge_p50_us"] > 0, part
    for tag in ("", "_redis"):
        lat = out[f"server_latency{tag}_ms"]
        assert 0 < lat["quotas_p50"] <= lat["quotas_p99"] and 0 < lat["none_p50"] <= lat["none_p99"]
        # the difference of the p50s, each rounded on its own
        assert abs(out[f"added{tag}_ms_p50"] - (lat["quotas_p50"] - lat["none_p50"])) < 0.0015
