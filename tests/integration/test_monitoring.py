"""The shipped monitoring files against Debian's promtool: the rules parse and their unit
tests fire and stay silent as they should; the exported Prometheus configuration is valid;
every dashboard expression is valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmhost.cli.main import app as cli_app
from llmhost.errors import ConfigError
from llmhost.observability.assets import ScrapeTarget, export, prometheus_config, read_asset
from tests.conftest import require_exe

TESTS = Path(__file__).parents[1] / "monitoring"


def promtool() -> str:
    return require_exe("promtool", "prometheus")


def run(*args: str, cwd: Path) -> str:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def dashboard_exprs() -> list[str]:
    dash = json.loads(read_asset("grafana/llmhost-dashboard.json"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """Grafana's variables replaced as Grafana would at query time."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$instance"', '".*"')
        .replace('"$model"', '".*"')
    )


def test_rules_check_and_unit_tests(tmp_path):
    exe = promtool()
    export(tmp_path)
    assert "SUCCESS: 8 rules found" in run(exe, "check", "rules", "alerts.yml", cwd=tmp_path)
    shutil.copy(TESTS / "alerts_test.yml", tmp_path)
    out = run(exe, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert "SUCCESS" in out


def test_guide_alerts_are_all_there():
    rules = read_asset("alerts.yml")
    for name in (
        "LlmhostGpuMemoryHigh",
        "LlmhostHighLatency",
        "LlmhostLoadAboveCores",
        "LlmhostDown",
        "LlmhostEngineNotReady",
        "LlmhostErrorRatioHigh",
        "LlmhostTimeToFirstTokenHigh",
        "LlmhostAuditRecordsDropped",
    ):
        assert f"alert: {name}\n" in rules


def test_exported_prometheus_config_is_valid(tmp_path):
    exe = promtool()
    key = tmp_path / "key"
    key.write_text("llmh_secret\n")
    written = export(
        tmp_path,
        ScrapeTarget(
            targets=("10.0.0.5:8080", "gpu-2:8080"),
            scheme="https",
            bearer_token_file=key,
            ca_file=key,
        ),
    )
    assert {p.name for p in written} >= {"prometheus.yml", "alerts.yml", "llmhost-dashboard.json"}
    out = run(exe, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS" in out and "8 rules found" in out
    text = (tmp_path / "prometheus.yml").read_text()
    assert '["10.0.0.5:8080", "gpu-2:8080"]' in text and "credentials_file" in text
    assert "scheme: https" in text
    for bad in ("nohost", "a:b", "x:99999", 'a"b:80', "a\nb:80"):
        with pytest.raises(ConfigError):
            prometheus_config(ScrapeTarget(targets=(bad,)))


def test_cli_export(tmp_path):
    r = CliRunner().invoke(cli_app, ["monitoring", "export", str(tmp_path / "m"), "-t", "h:9"])
    assert r.exit_code == 0, r.output
    assert '["h:9"]' in (tmp_path / "m" / "prometheus.yml").read_text()
    assert (tmp_path / "m" / "grafana" / "llmhost-dashboard.json").exists()


def test_dashboard_expressions_are_valid_promql(tmp_path):
    exe = promtool()
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": as_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "exprs.yml").write_text(json.dumps(rules))  # JSON is YAML
    out = run(exe, "check", "rules", "exprs.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out
    # and a broken expression is caught, so the check above means something
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(llmhost_requests_total[5m])"
    (tmp_path / "bad.yml").write_text(json.dumps(rules))
    p = subprocess.run([exe, "check", "rules", "bad.yml"], cwd=tmp_path, capture_output=True)
    assert p.returncode != 0


def test_dashboard_shape():
    dash = json.loads(read_asset("grafana/llmhost-dashboard.json"))
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[0] == "datasource" and dash["templating"]["list"][0]["query"] == "prometheus"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "requests",
        "latency",
        "first token",
        "per output token",
        "tokens/s",
        "gpu",
        "memory",
        "rate-limit",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
    # a model variable, and every query of a per-model metric narrowed by it
    assert "model" in names
    per_model = (
        "llmhost_requests_total",
        "llmhost_completion_tokens_total",
        "llmhost_prompt_tokens_total",
        "llmhost_time_to_first_token_seconds_bucket",
        "llmhost_time_per_output_token_seconds_bucket",
        "llmhost_model_loaded",
    )
    for expr in dashboard_exprs():
        if any(m in expr for m in per_model):
            assert 'model=~"$model"' in expr, expr
    assert "models loaded" in titles


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (histogram series by their family's sample names)."""
    return set(re.findall(r"\b((?:llmhost|process)_[a-z0-9_]+)\b", expr))
