"""Security and audit against a real `llmhost serve` (fake engine): audit records survive a
SIGTERM under load, and the gateway benchmark runs in its smoke form with every figure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI
from tests.e2e.conftest import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMHOST_HOME": str(home)},
    )


def test_audit_records_survive_sigterm_under_load(tmp_path):
    key = cli(tmp_path, "keys", "create", "--user", "loader").stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            "--engine",
            "fake",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "LLMHOST_HOME": str(tmp_path), "LLMHOST_RATE_LIMIT_RPS": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_ready(url, timeout=30)
    completed = []
    stop = threading.Event()

    def client(i: int) -> None:
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=h, timeout=30) as c:
            while not stop.is_set():
                try:
                    body = {"prompt": f"req {i}", "max_tokens": 4, "stream": i % 2 == 0}
                    r = c.post("/v1/completions", json=body)
                    if r.status_code == 200 and (not body["stream"] or "[DONE]" in r.text):
                        completed.append(i)
                except httpx.TransportError:
                    return  # the server has stopped listening

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(completed) > 50
    records = [
        json.loads(x)
        for x in cli(tmp_path, "audit", "search", "--json", "--limit", "100000").stdout.splitlines()
    ]
    # the requests' records (the key made above is a record of the CLI's too)
    ok = [r for r in records if r["status"] == 200 and r["route"].startswith("/v1/")]
    # every request a client saw complete has its record; none was lost in the shutdown
    assert len(ok) >= len(completed), (len(ok), len(completed))
    assert all(r["user_id"] == "loader" and r["prompt"].startswith("req ") for r in ok)
    v = cli(tmp_path, "audit", "verify")
    assert v.returncode == 0 and "chain intact" in v.stdout


def test_gateway_benchmark_smoke():
    if shutil.which("wrk") is None:
        if IN_CI:
            pytest.fail("wrk is required in CI but missing")
        pytest.skip("wrk not installed")
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gateway_overhead.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["wrk_req_s_all_on"] > 0 and out["latency_ms"]["on_p50"] > 0
    assert out["rate_limit"]["server_errors"] == 0
    assert all(95 <= n <= 100 for n in out["rate_limit"]["admitted_per_second"]), out
    assert out["audit"]["records"] == out["audit"]["requests"]
    assert "chain intact" in out["audit"]["verify"]


def test_streams_cut_by_the_shutdown_timeout_end_in_band_and_are_audited(tmp_path):
    """Streams still running when the grace period is nearly up end with an error event and
    [DONE] (not a cut connection), and each leaves its audit record with what it received."""
    port = free_port()
    env = {**os.environ, "LLMHOST_HOME": str(tmp_path), "LLMHOST_SHUTDOWN_TIMEOUT": "1"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "llmhost", "serve", "--demo", "--port", str(port)),
            *("--parallel", "4", "--ctx-size", "8192", "--threads", "2", "--log-level", "warning"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout=120)
    texts: dict[int, str] = {}
    started = threading.Barrier(5)

    def stream(i: int) -> None:
        body = {"prompt": f"tell {i}", "max_tokens": 8000, "stream": True, "ignore_eos": True}
        seen = []
        with (
            httpx.Client(base_url=url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for n, line in enumerate(r.iter_lines()):
                seen.append(line)
                if n == 20:
                    started.wait(timeout=60)
        texts[i] = "\n".join(seen)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for t in threads:
        t.join(timeout=30)
    assert len(texts) == 4
    for text in texts.values():
        events = [x for x in text.splitlines() if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
    records = [
        json.loads(x) for x in cli(tmp_path, "audit", "search", "--json").stdout.splitlines()
    ]
    assert sorted(r["status"] for r in records) == [503] * 4
    assert all(r["completion_tokens"] >= 20 for r in records), records
