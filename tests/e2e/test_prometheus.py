"""A real Prometheus (Debian's package) scrapes a live `llmhost serve` on the tiny model: the
request count and TTFT histogram come back through PromQL, the alert rules load, and every
metric the dashboard reads is one the server exposes."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmhost.observability.assets import ScrapeTarget, export
from llmhost.observability.metrics import Metrics
from tests.conftest import require_exe
from tests.e2e.conftest import Server, free_port
from tests.integration.test_monitoring import dashboard_exprs, metric_names
from tests.unit.test_metrics import FakeNvml

REQUESTS = 5


def prometheus_exe() -> str:
    return require_exe("prometheus", "prometheus")


def exposed_names(text: str) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
    return names


def query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_live_server(tiny_model, tmp_path):
    exe = prometheus_exe()
    (tmp_path / "home").mkdir()
    srv = Server(tmp_path / "home", str(tiny_model.gguf), "--parallel", "2")
    prom = None
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(REQUESTS):
                r = c.post(
                    "/v1/completions",
                    json={
                        "prompt": f"hello {i}",
                        "max_tokens": 8,
                        "ignore_eos": True,
                        "stream": i % 2 == 0,
                    },
                )
                assert r.status_code == 200, r.text
            live = c.get("/metrics").text

        # the dashboard reads only what a server exposes (GPU series from a host with GPUs)
        gpu_host = exposed_names(Metrics(nvml=FakeNvml()).render().decode())
        exposed = exposed_names(live) | gpu_host
        for expr in dashboard_exprs():
            missing = metric_names(expr) - exposed
            assert not missing, (expr, missing)

        conf = tmp_path / "prom"
        export(conf, ScrapeTarget(targets=(f"127.0.0.1:{srv.port}",)))
        cfg = conf / "prometheus.yml"
        cfg.write_text(cfg.read_text().replace("scrape_interval: 15s", "scrape_interval: 1s"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = (tmp_path / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        count, ttft = None, None
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                count = query(
                    base, 'sum(llmhost_requests_total{route="/v1/completions",status="200"})'
                )
                ttft = query(base, "sum(llmhost_time_to_first_token_seconds_count)")
            except httpx.HTTPError:
                count = None
            if count and ttft:
                break
            time.sleep(0.5)
        assert count and float(count[0]["value"][1]) == REQUESTS, count
        assert float(ttft[0]["value"][1]) == REQUESTS
        buckets = query(base, "llmhost_time_to_first_token_seconds_bucket")
        assert len(buckets) > 5 and max(float(b["value"][1]) for b in buckets) == REQUESTS
        p50 = query(
            base,
            "histogram_quantile(0.5, sum by (le) (llmhost_time_to_first_token_seconds_bucket))",
        )
        assert 0 < float(p50[0]["value"][1]) < 60
        assert (
            float(query(base, "sum(llmhost_completion_tokens_total)")[0]["value"][1])
            == 8 * REQUESTS
        )
        targets = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        rules = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"][0]["rules"]
        assert len(rules) == 8 and all(r["health"] in ("ok", "unknown") for r in rules), json.dumps(
            rules
        )
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        assert srv.stop() == 0
