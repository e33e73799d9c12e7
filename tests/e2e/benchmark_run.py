"""Runs a benchmark script from `benchmarks/` as its smoke tests do: in a subprocess, with
the source tree first on the path, and returns the JSON line it ends with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> dict:
    """The figures `benchmarks/<script>` prints last; its output's tail when it fails."""
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
