"""`llmhost serve`: load a model and serve the OpenAI-compatible API. The options that mirror a
setting take their help and shown default from `Settings`; which models, and their checks, come
from `llmhost.ops.serve`."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from llmhost.cli.options import setting
from llmhost.config import Settings, load_settings
from llmhost.errors import ConfigError, ModelLoadError
from llmhost.ops import serve as ops

if TYPE_CHECKING:
    from llmhost.engines.base import Engine
    from llmhost.engines.pool import Pool

log = logging.getLogger("llmhost.serve")
err = Console(stderr=True, highlight=False)
# Flags that are no setting of their own; every other option of `serve` is one.
NOT_SETTINGS = ("demo", "all_models", "no_auth", "from_plan", "plan_gpu", "restart_on_crash")
CORS_MORE = (
    "Repeat or separate with commas. With --demo: http://localhost:* and http://127.0.0.1:*."
)
Models = Annotated[
    list[str] | None,
    typer.Argument(
        help="GGUF file, model folder, or a stored name:tag / name@channel; several are "
        "served together, each loaded when first asked for."
    ),
]
Demo = Annotated[bool, typer.Option("--demo", help="Serve the built-in demo model.")]
AllModels = Annotated[
    bool, typer.Option("--all-models", help="Serve every model in the store (loaded on demand).")
]
NoAuth = Annotated[
    bool, typer.Option("--no-auth", help="Accept requests without an API key or JWT.")
]
FromPlan = Annotated[
    Path | None,
    typer.Option(help="vllm: JSON of `llmhost plan --json`; its GPU count sets --tensor-parallel."),
]
PlanGpu = Annotated[str | None, typer.Option(help="With --from-plan: which GPU row.")]
RestartOnCrash = Annotated[
    bool, typer.Option("--restart-on-crash", help="Supervise: restart the server when it dies.")
]


def serve(
    models: Models = None,
    demo: Demo = False,
    all_models: AllModels = False,
    memory_budget_mb: Annotated[int | None, setting("memory_budget_mb")] = None,
    gpu_memory_budget_mb: Annotated[int | None, setting("gpu_memory_budget_mb")] = None,
    keep_alive: Annotated[str | None, setting("keep_alive")] = None,
    host: Annotated[str | None, setting("host")] = None,
    port: Annotated[int | None, setting("port")] = None,
    engine: Annotated[str | None, setting("engine")] = None,
    model_name: Annotated[str | None, setting("model_name")] = None,
    threads: Annotated[int | None, setting("threads")] = None,
    ctx_size: Annotated[int | None, setting("ctx_size", "--ctx-size", "--ctx")] = None,
    parallel: Annotated[int | None, setting("parallel")] = None,
    batch_size: Annotated[int | None, setting("batch_size")] = None,
    max_queue: Annotated[int | None, setting("max_queue")] = None,
    model_key_file: Annotated[Path | None, setting("model_key_file", "--key-file")] = None,
    model_key_command: Annotated[str | None, setting("model_key_command", "--key-command")] = None,
    log_format: Annotated[str | None, setting("log_format")] = None,
    log_level: Annotated[str | None, setting("log_level")] = None,
    no_auth: NoAuth = False,
    ssl_certfile: Annotated[Path | None, setting("ssl_certfile")] = None,
    ssl_keyfile: Annotated[Path | None, setting("ssl_keyfile")] = None,
    metrics_port: Annotated[int | None, setting("metrics_port")] = None,
    metrics_auth: Annotated[
        bool | None, setting("metrics_auth", "--metrics-auth/--metrics-public")
    ] = None,
    upstream_url: Annotated[str | None, setting("upstream_url")] = None,
    tensor_parallel: Annotated[int | None, setting("tensor_parallel")] = None,
    pipeline_parallel: Annotated[int | None, setting("pipeline_parallel")] = None,
    distributed_backend: Annotated[str | None, setting("distributed_backend")] = None,
    quantization: Annotated[str | None, setting("quantization")] = None,
    dtype: Annotated[str | None, setting("dtype")] = None,
    device: Annotated[str | None, setting("device")] = None,
    allow_pickle: Annotated[bool | None, setting("allow_pickle", "--allow-pickle")] = None,
    gpu_memory_utilization: Annotated[float | None, setting("gpu_memory_utilization")] = None,
    vllm_args: Annotated[str | None, setting("vllm_args")] = None,
    from_plan: FromPlan = None,
    plan_gpu: PlanGpu = None,
    restart_on_crash: RestartOnCrash = False,
    verify_on_load: Annotated[str | None, setting("verify_on_load")] = None,
    tool_parser: Annotated[str | None, setting("tool_parser")] = None,
    cors_origins: Annotated[
        list[str] | None, setting("cors_origins", "--cors-origins", more=CORS_MORE)
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API. Clients need an API key
    (`llmhost keys create`) or a JWT, except with --no-auth or --demo."""
    given = dict(locals())  # every parameter, before any other name is bound
    flags = {k: v for k, v in given.items() if k not in NOT_SETTINGS and k != "models"}
    if restart_on_crash:
        _supervise(log_level)
    refs = list(models or [])
    settings = load_settings(
        **{**flags, "cors_origins": cors_origins or None},
        model=refs[0] if len(refs) == 1 else None,
        auth=False if (no_auth or demo) else None,
    )
    if from_plan is not None:
        settings = settings.model_copy(update=ops.plan_settings(from_plan, plan_gpu, settings))
    from llmhost.security.tls import check_server_files

    check_server_files(settings.ssl_certfile, settings.ssl_keyfile)
    multi = len(refs) > 1 or all_models or bool(settings.models)
    if demo:
        if len(refs) == 1 and not multi:
            raise ConfigError("give either a model path or --demo, not both")
        settings = _with_demo_model(settings)
    if multi:
        _serve_several(settings, refs, all_models, demo)
    else:
        _serve_one(settings if demo else ops.with_stored_model(settings))


def _with_demo_model(settings: Settings) -> Settings:
    settings = ops.with_demo_model(settings)
    err.print(
        "[yellow]Serving the demo model: random weights, its output is meaningless.[/] "
        "Pass a GGUF path to serve a real model."
    )
    return settings


def _supervise(log_level: str | None) -> None:
    """Run this same command again under a supervisor that restarts it when it dies."""
    from llmhost.observability.logs import setup_logging
    from llmhost.ops.supervise import supervise

    setup_logging(log_level or "info", "text")
    argv = [a for a in sys.argv[1:] if a != "--restart-on-crash"]
    raise typer.Exit(supervise([sys.executable, "-m", "llmhost", *argv]))


def _serve_one(settings: Settings) -> None:
    from llmhost.engines.registry import create_engine

    _check_model_files(settings)
    engine = create_engine(settings.engine, settings)  # a missing model fails here, first
    _warn_about_auth(settings)
    name = Path(settings.model).stem if settings.model else engine.model_info.id
    about = f"model: {settings.model_name or name}"
    serve_settings(settings, engine, lambda: _announce(settings, about))


def _serve_several(settings: Settings, refs: list[str], all_models: bool, demo: bool) -> None:
    """Serve every model named, declared in config.toml or stored (`--all-models`), each
    loaded on its first request within the memory budget; with --demo the demo model first."""
    from llmhost.ops.serve_models import build_pool

    models = ops.several(settings, refs, all_models, demo)
    for _, _, s in models:
        _check_model_files(s)
    pool = build_pool(settings, models)
    _warn_about_auth(settings)
    budget = pool.budget_bytes or 0
    gpus = "".join(f", GPU {i} {n / (1 << 30):.1f} GiB" for i, n in pool.gpu_budget.items())
    about = f"models: {', '.join(pool.ids())}; memory budget {budget / (1 << 30):.1f} GiB{gpus}"
    serve_settings(settings, pool, lambda: _announce(settings, about))


def _announce(settings: Settings, about: str) -> None:
    scheme = "https" if settings.ssl_certfile else "http"
    err.print(f"OpenAI-compatible API at {scheme}://{settings.host}:{settings.port}/v1 ({about})")


def _check_model_files(settings: Settings) -> None:
    checked = ops.check_model_files(settings)
    if checked is not None and checked.unhashed:
        ref = checked.manifest.ref
        err.print(
            f"[yellow]{ref}: file sizes match the manifest; the sha256 of "
            f"{len(checked.unhashed)} file(s) over {settings.verify_hash_max_mb} MiB was not "
            f"checked at start.[/] Run `llmhost verify {ref}` once: a verified model is "
            "trusted until its files change."
        )


def _warn_about_auth(settings: Settings) -> None:
    loopback = settings.host in ("127.0.0.1", "localhost", "::1") or settings.host.startswith(
        "127."
    )
    if not settings.auth:
        if not loopback:
            err.print(
                f"[bold red]WARNING: authentication is OFF and the server listens on "
                f"{settings.host}: anyone who can reach port {settings.port} can use it.[/]"
            )
            log.warning("authentication is off on a non-loopback address %s", settings.host)
        return
    from llmhost.security.auth import KeyStore

    if not settings.jwt_configured and not settings.keys_db.exists():
        err.print(
            "Authentication is on and no API key exists yet: create one with "
            "`llmhost keys create --user NAME` (or configure LLMHOST_JWT_*)."
        )
    elif not settings.jwt_configured:
        with contextlib.closing(KeyStore(settings.keys_db)) as keys:
            if not any(k.state() == "active" for k in keys.list()):
                err.print("Authentication is on and every API key is revoked or expired.")


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host"
            ) from exc


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die
        "killed by signal"; a shutdown that drained cleanly should exit 0 instead."""

        on_exit: Callable[[], None] | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.on_exit is not None:
                self.on_exit()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return GracefulServer


def serve_settings(
    settings: Settings, engine: Engine | Pool, announce: Callable[[], None] | None = None
) -> None:
    """Serve `engine` (one model's, or a pool of several) until SIGINT/SIGTERM; in-flight
    streams get `shutdown_timeout` to end. `announce` runs once the ports are known free,
    just before the server starts listening."""
    import uvicorn

    from llmhost.api import create_app
    from llmhost.observability.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    _check_port_free(settings.host, settings.port)
    if settings.metrics and settings.metrics_port:
        _check_port_free(settings.host, settings.metrics_port)
    if announce is not None:
        announce()
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(engine, settings, on_fatal=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]  # seconds, any float
        timeout_keep_alive=30,
    )
    server = _graceful_server_class()(config)
    # Streams still running near the end of the grace period end with an in-band error.
    server.on_exit = lambda: app.state.drain.begin(settings.shutdown_timeout)  # type: ignore[union-attr]
    server.run()
    if app.state.load_error is not None:
        raise ModelLoadError(f"the model failed to load: {app.state.load_error}")
