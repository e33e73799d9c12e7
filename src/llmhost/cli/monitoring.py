"""`llmhost monitoring`: write the Prometheus and Grafana files for this server."""

from __future__ import annotations

from pathlib import Path

import typer

from llmhost.observability.assets import ScrapeTarget, export

monitoring_app = typer.Typer(help="Prometheus/Grafana set-up for llmhost.", no_args_is_help=True)


@monitoring_app.command("export")
def export_cmd(
    folder: Path = typer.Argument(..., help="Folder to write the files into."),
    target: list[str] = typer.Option(
        ["127.0.0.1:8080"], "--target", "-t", help="HOST:PORT of a server (repeatable)."
    ),
    https: bool = typer.Option(False, "--https", help="Scrape over HTTPS."),
    token_file: Path | None = typer.Option(
        None, help="File with an API key, when /metrics needs one (--metrics-auth)."
    ),
    ca_file: Path | None = typer.Option(None, help="CA certificate to verify HTTPS with."),
) -> None:
    """Write prometheus.yml (scraping the targets), alerts.yml (the guide's alert rules and
    more) and a Grafana dashboard with provisioning files."""
    written = export(
        folder,
        ScrapeTarget(
            targets=tuple(target),
            scheme="https" if https else "http",
            bearer_token_file=token_file.resolve() if token_file else None,
            ca_file=ca_file.resolve() if ca_file else None,
        ),
    )
    for path in written:
        typer.echo(str(path))
    typer.echo(
        f"Run: prometheus --config.file={folder / 'prometheus.yml'}  and import "
        f"{folder / 'grafana/llmhost-dashboard.json'} into Grafana.",
        err=True,
    )
