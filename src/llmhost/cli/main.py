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
)
from llmhost.errors import LlmhostError

app = typer.Typer(
    name="llmhost",
    help="Run large language models on your own machines behind an OpenAI-compatible API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
serve.register(app)
bench.register(app)
models.register(app)
crypto.register(app)
audit.register(app)
keys.register(app)
cert.register(app)
monitoring.register(app)
plan.register(app)
doctor.register(app)
backup.register(app)
router.register(app)
deploy.register(app)
loadtest.register(app)
demo.register(app)
running.register(app)


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
