"""The quota overhead benchmark in smoke form (the full run is by hand): every figure is
reported, in memory and through a real Redis, in process and through a real server."""

from __future__ import annotations

from tests.conftest import require, require_exe
from tests.e2e.benchmark_run import run_benchmark


def test_quota_overhead_benchmark_smoke():
    require_exe("redis-server", "redis-server")
    require("redis")
    out = run_benchmark("quota_overhead.py", "--smoke", timeout=300)
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
