"""Entry point of the `llmhost` command: registers the command groups and turns llmhost errors
into one clear line and a non-zero exit."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from llmhost import __version__
from llmhost.cli import (
    audit,
    backup,
    bench,
    cert,
    crypto,
    demo,
    deploy,
    doctor,
    keys,
    loadtest,
    models,
    monitoring,
    plan,
    router,
    running,
    serve,
    usage,
)
from llmhost.errors import LlmhostError

app = typer.Typer(
    name="llmhost",
    help="Run large language models on your own machines behind an OpenAI-compatible API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Every command and group, in the order `llmhost --help` lists them.
app.command()(serve.serve)
app.command()(bench.bench)
app.command()(models.pull)
app.command("list")(models.list_models)
app.command()(models.show)
app.command()(models.rm)
app.command()(models.tag)
app.command()(models.promote)
app.command()(models.verify)
app.command()(crypto.encrypt)
app.command()(crypto.decrypt)
app.add_typer(audit.audit_app, name="audit")
app.add_typer(keys.keys_app, name="keys")
app.command()(usage.usage)
app.add_typer(cert.cert_app, name="cert")
app.add_typer(monitoring.monitoring_app, name="monitoring")
app.command()(plan.plan)
app.command()(doctor.doctor)
app.add_typer(backup.backup_app, name="backup")
app.command()(router.router)
app.add_typer(deploy.deploy_app, name="deploy")
app.command()(deploy.systemd)
app.command()(loadtest.loadtest)
app.command("demo-model")(demo.demo_model)
app.add_typer(running.models_app, name="models")


@app.command()
def version() -> None:
    """Print llmhost's version and the engine libraries it finds."""
    import contextlib
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    typer.echo(f"llmhost {__version__}")
    for dist in ("llama-cpp-python", "transformers", "torch", "vllm"):
        with contextlib.suppress(PackageNotFoundError):
            typer.echo(f"  {dist} {pkg_version(dist)}")


def run() -> None:
    try:
        app()
    except LlmhostError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
