"""The console pages benchmark in smoke form (the full run, 1,000,000 audit records and 10,000
keys, is by hand): every page answers, every figure is reported and read the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require
from tests.e2e.benchmark_run import run_benchmark

require("llama_cpp")

ROOT = Path(__file__).resolve().parents[2]
PAGES = {
    "overview",
    "usage_user",
    "usage_key",
    "usage_model",
    "usage_day",
    "keys",
    "audit",
    "audit_user",
    "audit_model",
    "audit_model_rare",
    "audit_status",
    "audit_status_rare",
    "audit_user_model",
    "audit_day",
    "audit_30_days",
    "audit_30_days_model",
    "audit_page_20",
    "playground",
}


def test_console_pages_benchmark_smoke(tmp_path):
    env = {
        **os.environ,
        "LLMHOST_BENCH_CACHE": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out = run_benchmark("console_pages.py", "--smoke", "-n", "5", env=env, timeout=300)
    assert (out["records"], out["keys"], out["requests_per_page"]) == (20_000, 200, 5)
    assert set(out["pages"]) == PAGES
    for name, fig in out["pages"].items():
        assert 0 < fig["p50_ms"] <= fig["p95_ms"], name
        assert fig["kb"] > 0, name
        assert fig["under_200ms_p95"] == (fig["p95_ms"] < 200), name
    assert out["all_under_200ms_p95"] == all(f["under_200ms_p95"] for f in out["pages"].values())
    # the home was built once, with its admin key, and the log it wrote verifies
    (home,) = tmp_path.glob("console-v3-20000-200")
    verified = subprocess.run(
        [sys.executable, "-m", "llmhost", "audit", "verify"],
        env={**env, "LLMHOST_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
