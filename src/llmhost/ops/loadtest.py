"""Runs Locust headless against a server with the shipped locustfile and reads its CSV
statistics back: requests, failures, latency percentiles and TTFT."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llmhost.errors import ConfigError


@dataclass(frozen=True)
class LoadTest:
    url: str
    users: int = 10
    spawn_rate: float = 2.0
    duration: str = "60s"
    api_key: str | None = None
    model: str | None = None
    max_tokens: int = 64
    out: Path = Path("loadtest")


def locustfile() -> Path:
    return Path(__file__).with_name("locustfile.py")


def command(lt: LoadTest) -> list[str]:
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if exe is None:
        raise ConfigError("Locust is not installed: pip install 'llmhost[loadtest]'")
    return [
        exe,
        "-f",
        str(locustfile()),
        "--headless",
        "--host",
        lt.url.rstrip("/"),
        "-u",
        str(lt.users),
        "-r",
        str(lt.spawn_rate),
        "-t",
        lt.duration,
        "--csv",
        str(lt.out / "loadtest"),
        "--html",
        str(lt.out / "report.html"),
        "--only-summary",
        "--stop-timeout",
        "30",
    ]


def run(lt: LoadTest) -> dict:
    if lt.users < 1 or lt.spawn_rate <= 0 or lt.max_tokens < 1:
        raise ConfigError("--users and --max-tokens must be >= 1 and --spawn-rate > 0")
    lt.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LLMHOST_LT_MAX_TOKENS": str(lt.max_tokens)}
    if lt.api_key:
        env["LLMHOST_API_KEY"] = lt.api_key
    if lt.model:
        env["LLMHOST_LT_MODEL"] = lt.model
    p = subprocess.run(command(lt), env=env, capture_output=True, text=True)
    stats = lt.out / "loadtest_stats.csv"
    if not stats.exists():
        raise ConfigError(f"Locust did not run: {(p.stderr or p.stdout)[-1500:]}")
    return {
        "exit_code": p.returncode,
        "stats": read_stats(stats),
        "report": str(lt.out / "report.html"),
    }


def read_stats(path: Path) -> list[dict]:
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            out.append(
                {
                    "type": row["Type"],
                    "name": row["Name"],
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "p50_ms": float(row["50%"] or 0),
                    "p95_ms": float(row["95%"] or 0),
                    "p99_ms": float(row["99%"] or 0),
                    "rps": float(row["Requests/s"] or 0),
                }
            )
    return out
