"""`llmhost loadtest`: the guide's Locust load test, headless, with CSV and HTML reports."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from llmhost.cli.options import ApiKey


def loadtest(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8080"),
    users: int = typer.Option(10, help="Concurrent simulated users."),
    spawn_rate: float = typer.Option(2.0, help="Users started per second."),
    duration: str = typer.Option("60s", help="Run time, e.g. 60s, 5m."),
    api_key: ApiKey = None,
    model: str | None = typer.Option(None),
    max_tokens: int = typer.Option(64),
    out: Path = typer.Option(Path("loadtest"), help="Folder for the CSV and HTML reports."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run Locust headless (streaming chat with TTFT, and plain completions); exit 1 when any
    request failed."""
    from llmhost.ops.loadtest import LoadTest, run

    result = run(LoadTest(url, users, spawn_rate, duration, api_key, model, max_tokens, out))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        table = Table("type", "name", "requests", "failures", "p50 ms", "p95 ms", "p99 ms", "req/s")
        for s in result["stats"]:
            table.add_row(
                s["type"],
                s["name"],
                str(s["requests"]),
                str(s["failures"]),
                f"{s['p50_ms']:.0f}",
                f"{s['p95_ms']:.0f}",
                f"{s['p99_ms']:.0f}",
                f"{s['rps']:.2f}",
            )
        Console().print(table)
        Console(stderr=True).print(f"HTML report: {result['report']}", highlight=False)
    failures = sum(s["failures"] for s in result["stats"] if s["name"] == "Aggregated")
    raise typer.Exit(1 if failures or result["exit_code"] else 0)
