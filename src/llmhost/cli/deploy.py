"""`llmhost deploy`: blue-green model upgrades behind `llmhost router`, with automatic
rollback; `llmhost systemd`: unit files for the server and the router."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import typer

from llmhost.cli.options import AdminTokenFile
from llmhost.config import load_settings
from llmhost.errors import ConfigError


def _deployer(token_file: Path | None):
    from llmhost.ops.deploy import Deployer

    token = os.environ.get("LLMHOST_ROUTER_TOKEN")
    if token_file is not None:
        token = token_file.read_text().strip()
    settings = load_settings()
    return Deployer(
        settings.home / "deploy.json", admin_token=token, say=lambda m: typer.echo(m, err=True)
    ), settings


deploy_app = typer.Typer(help="Blue-green upgrades behind `llmhost router`.", no_args_is_help=True)


@deploy_app.command()
def init(
    router: str = typer.Option(..., help="URL of the llmhost router (upstreams blue, green)."),
    blue_port: int = typer.Option(..., min=1, max=65535),
    green_port: int = typer.Option(..., min=1, max=65535),
    live: str = typer.Option("blue", help="The colour serving now."),
    live_pid: int | None = typer.Option(None, help="Its process id, so a switch can stop it."),
    live_model: str | None = typer.Option(None),
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Record the router and the ports of the two colours."""
    d, _ = _deployer(admin_token_file)
    st = d.init(router, blue_port, green_port, live, live_pid, live_model)
    typer.echo(f"{st.live} is live behind {st.router}")


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--steps {text!r}: fractions such as 0.1,0.5,1") from exc
    if not out or any(not 0 < x <= 1 for x in out) or out != sorted(out):
        raise ConfigError("--steps rise from above 0 to at most 1, e.g. 0.1,0.5,1")
    return out


@deploy_app.command()
def start(
    model: str = typer.Option(..., "--model", help="What the idle colour serves (path, name:tag)."),
    steps: str = typer.Option(
        "1", help="Traffic shares, e.g. 0.1,0.5,1; ending below 1 = a canary awaiting `promote`."
    ),
    step_seconds: float = typer.Option(10.0, min=0, help="Watch time at each partial step."),
    watch: float = typer.Option(60.0, min=0, help="Seconds to watch after the switch."),
    max_error_ratio: float = typer.Option(0.05, min=0, max=1),
    max_p99: float = typer.Option(30.0, min=0, help="Seconds."),
    serve_args: str = typer.Option("", help="More `llmhost serve` flags, e.g. '--parallel 8'."),
    smoke_key_file: Path | None = typer.Option(None, help="API key for the smoke request."),
    ready_timeout: float = typer.Option(300.0, min=1),
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Start the idle colour, smoke-test it, shift traffic, drain and stop the old colour;
    roll back automatically if errors or latency breach the limits."""
    from llmhost.ops.deploy import Guard

    d, settings = _deployer(admin_token_file)
    headers = {}
    if smoke_key_file is not None:
        headers = {"Authorization": f"Bearer {smoke_key_file.read_text().strip()}"}
    st = d.start(
        model,
        home=settings.home,
        args=shlex.split(serve_args),
        steps=_floats(steps),
        step_s=step_seconds,
        guard=Guard(watch, max_error_ratio, max_p99),
        ready_timeout=ready_timeout,
        smoke_headers=headers,
    )
    typer.echo(f"live: {st.live}" + (f", canary: {st.canary}" if st.canary else ""))


@deploy_app.command()
def status(admin_token_file: AdminTokenFile = None) -> None:
    """The live colour, the canary, each colour's process and the router's view."""
    from dataclasses import asdict

    from llmhost.ops.deploy import DeployState

    d, _ = _deployer(admin_token_file)
    st = DeployState.load(d.state_path)
    typer.echo(json.dumps({**asdict(st), "router_status": d._status(st)}, indent=1))


@deploy_app.command()
def promote(
    watch: float = typer.Option(60.0, min=0),
    max_error_ratio: float = typer.Option(0.05, min=0, max=1),
    max_p99: float = typer.Option(30.0, min=0),
    admin_token_file: AdminTokenFile = None,
) -> None:
    """Give the canary all traffic, drain and stop the old colour (with the same guard)."""
    from llmhost.ops.deploy import Guard

    d, _ = _deployer(admin_token_file)
    st = d.promote(Guard(watch, max_error_ratio, max_p99))
    typer.echo(f"live: {st.live}")


@deploy_app.command()
def rollback(admin_token_file: AdminTokenFile = None) -> None:
    """Take traffic back: from a canary, or to the previous colour while it still runs."""
    d, _ = _deployer(admin_token_file)
    st = d.rollback()
    typer.echo(f"live: {st.live}")


def systemd(
    out: Path = typer.Option(..., help="Folder for the unit files (e.g. /etc/systemd/system)."),
    model: str | None = typer.Option(None, help="Model the server unit serves."),
    port: int = typer.Option(8080),
    upstream: list[str] = typer.Option(
        [], "--upstream", "-u", help="Also write a router unit with these upstreams."
    ),
    router_port: int = typer.Option(8000),
    user: str = typer.Option("llmhost", help="User the services run as."),
) -> None:
    """Unit files that restart the server and the router when they die."""
    exe = shutil.which("llmhost") or f"{sys.executable} -m llmhost"
    home = load_settings().home
    common = (
        f"User={user}\nEnvironment=LLMHOST_HOME={home}\nRestart=always\nRestartSec=2\n"
        "TimeoutStopSec=60\nKillSignal=SIGTERM\nLimitNOFILE=65536\n"
    )
    units = {
        "llmhost.service": (
            "[Unit]\nDescription=llmhost OpenAI-compatible LLM server\n"
            "After=network-online.target\n"
            "Wants=network-online.target\n\n[Service]\n"
            f"ExecStart={exe} serve {shlex.quote(model) + ' ' if model else ''}--port {port}\n"
            + common
            + "\n[Install]\nWantedBy=multi-user.target\n"
        )
    }
    if upstream:
        ups = " ".join(f"-u {shlex.quote(u)}" for u in upstream)
        units["llmhost-router.service"] = (
            "[Unit]\nDescription=llmhost router\nAfter=network-online.target\n\n[Service]\n"
            f"ExecStart={exe} router {ups} --host 0.0.0.0 --port {router_port}\n"
            + common
            + "\n[Install]\nWantedBy=multi-user.target\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (out / name).write_text(text)
        typer.echo(str(out / name))
    typer.echo(
        "Then: systemctl daemon-reload && systemctl enable --now " + " ".join(units), err=True
    )
