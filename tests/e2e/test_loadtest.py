"""`llmhost loadtest` runs Locust headless against a live server and reports TTFT; `llmhost
bench --slo` checks the guide's targets and fails when one is missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmhost.errors import ConfigError
from llmhost.ops.bench import parse_slo
from tests.conftest import IN_CI
from tests.e2e.conftest import Server


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("lt"), "--engine", "fake")
    srv.wait_ready()
    yield srv
    srv.stop()


def llmhost(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
    )


def test_locust_headless(fake_server, tmp_path):
    p = llmhost(
        "loadtest",
        fake_server.url,
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--duration",
        "6s",
        "--max-tokens",
        "4",
        "--out",
        str(tmp_path),
        "--json",
    )
    if "Locust is not installed" in p.stderr and not IN_CI:
        pytest.skip("locust not installed")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(p.stdout)
    rows = {(s["type"], s["name"]): s for s in out["stats"]}
    assert rows[("TTFT", "time to first token")]["requests"] > 0
    assert rows[("POST", "/v1/chat/completions (stream)")]["failures"] == 0
    assert rows[("POST", "/v1/completions")]["requests"] > 0
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "loadtest_stats.csv").exists()


def test_bench_slo(fake_server):
    base = [
        "bench",
        fake_server.url,
        "--concurrency",
        "1",
        "--requests",
        "3",
        "--output-tokens",
        "4",
        "--prompt-tokens",
        "4",
    ]
    p = llmhost(*base, "--slo", "ttft=60s,e2e_p99=60s,success=100%,throughput=0.1", "--json")
    assert p.returncode == 0, p.stderr
    slo = json.loads(p.stdout)["results"][0]["slo"]
    assert [t["met"] for t in slo] == [True] * 4
    p = llmhost(*base, "--slo", "ttft=0.001ms")
    assert p.returncode == 1 and "missed" in p.stdout
    p = llmhost(*base, "--slo", "latency=1s")
    assert p.returncode == 2 and "one of ttft" in p.stderr


def test_parse_slo():
    t = parse_slo("ttft=300ms,tpot_p99=0.1s,throughput=50,success=99.95%")
    assert [(x.path, x.limit, x.at_most) for x in t] == [
        ("ttft_ms.p50", 300.0, True),
        ("tpot_ms.p99", 100.0, True),
        ("output_throughput", 50.0, False),
        ("success", 0.9995, False),
    ]
    for bad in ("", "ttft", "ttft=fast", "ttft_p42=1s", "success=150%", "throughput=x"):
        with pytest.raises(ConfigError):
            parse_slo(bad)
