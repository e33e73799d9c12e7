"""The monitoring files shipped in the package (Prometheus configuration, alert rules, a
Grafana dashboard and its provisioning), written out for an operator's Prometheus/Grafana."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmhost.errors import ConfigError

ASSETS = (
    "alerts.yml",
    "prometheus.yml",
    "grafana/llmhost-dashboard.json",
    "grafana/datasource.yml",
    "grafana/dashboards.yml",
)


def read_asset(name: str) -> str:
    if name not in ASSETS:
        raise KeyError(name)
    return (
        resources.files("llmhost.observability").joinpath("monitoring").joinpath(name).read_text()
    )


@dataclass(frozen=True)
class ScrapeTarget:
    """Where Prometheus finds llmhost, and how it authenticates (a key file when /metrics
    is protected)."""

    targets: tuple[str, ...] = ("127.0.0.1:8080",)
    scheme: str = "http"
    bearer_token_file: Path | None = None
    ca_file: Path | None = None


def prometheus_config(target: ScrapeTarget) -> str:
    for t in target.targets:
        host, _, port = t.rpartition(":")
        if (
            not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
            or any(c in t for c in "\n\"'")
        ):
            raise ConfigError(f"scrape target {t!r} is not HOST:PORT")
    if target.scheme not in ("http", "https"):
        raise ConfigError("scheme must be http or https")
    auth = []
    if target.bearer_token_file is not None:
        auth += [
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {json.dumps(str(target.bearer_token_file))}",
        ]
    if target.ca_file is not None:
        auth += ["    tls_config:", f"      ca_file: {json.dumps(str(target.ca_file))}"]
    return (
        read_asset("prometheus.yml")
        .replace("__SCHEME__", target.scheme)
        .replace("__TARGETS__", json.dumps(list(target.targets)))
        .replace("__AUTH__\n", "".join(line + "\n" for line in auth))
    )


def export(folder: Path, target: ScrapeTarget | None = None) -> list[Path]:
    """Write every asset under `folder` (sub-folders as shipped); returns the paths written."""
    written = []
    for name in ASSETS:
        text = (
            prometheus_config(target or ScrapeTarget())
            if name == "prometheus.yml"
            else (read_asset(name))
        )
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        written.append(path)
    return written
