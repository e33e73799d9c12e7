"""`llmhost doctor`: is this host ready to serve models? Exit 0 all pass, 1 warnings, 2 failures."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from llmhost.config import load_settings

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def doctor(
    as_json: bool = typer.Option(False, "--json"),
    io_mb: int = typer.Option(256, min=16, max=16384, help="Size of the disk read test (MB)."),
    port: int | None = typer.Option(None, help="Service port to check [configured, 8080]."),
    host: str | None = typer.Option(None, help="Service address to check [configured]."),
) -> None:
    """Check OS, kernel, Python and packages, NVIDIA driver/CUDA/GPUs/NCCL/links, disk space and
    read speed of the models folder, RAM reserve, swap, zswap, SELinux and the service port."""
    from llmhost.ops.doctor import Doctor, as_dicts, exit_code

    settings = load_settings(port=port, host=host)
    checks = Doctor(settings, io_bytes=io_mb << 20).run()
    code = exit_code(checks)
    if as_json:
        typer.echo(json.dumps({"exit_code": code, "checks": as_dicts(checks)}))
    else:
        table = Table("check", "status", "reason", "fix")
        for c in checks:
            table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.reason, c.fix)
        Console().print(table)
    raise typer.Exit(code)
