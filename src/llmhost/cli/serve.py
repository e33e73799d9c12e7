"""`llmhost serve`: load a model and serve the OpenAI-compatible API."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from llmhost.config import Settings, load_settings
from llmhost.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from llmhost.engines.pool import Pool

log = logging.getLogger("llmhost.serve")
# Engines whose model is a name on another server, not a file here.
REMOTE_ENGINES = frozenset({"openai"})
# --demo lets pages served from this machine call it, e.g. a front end under development.
DEMO_CORS_ORIGINS = ["http://localhost:*", "http://127.0.0.1:*"]


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


def serve_settings(settings: Settings, pool: Pool | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight streams get `shutdown_timeout` to end.
    With a pool, its models are served (loaded on demand); otherwise the settings' model."""
    import uvicorn

    from llmhost.api import create_app
    from llmhost.engines.registry import create_engine
    from llmhost.observability.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    engine = pool if pool is not None else create_engine(settings.engine, settings)
    _check_port_free(settings.host, settings.port)
    if settings.metrics and settings.metrics_port:
        _check_port_free(settings.host, settings.metrics_port)
    server: uvicorn.Server | None = None
    _GracefulServer = _graceful_server_class()

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
    server = _GracefulServer(config)
    # Streams still running near the end of the grace period end with an in-band error.
    server.on_exit = lambda: app.state.drain.begin(settings.shutdown_timeout)  # type: ignore[union-attr]
    server.run()
    if app.state.load_error is not None:
        raise ModelLoadError(f"the model failed to load: {app.state.load_error}")


def _serve_several(settings: Settings, refs: list[str], all_models: bool, demo: bool) -> None:
    """Serve every model named, declared in config.toml or stored (`--all-models`), each
    loaded on its first request within the memory budget; with --demo the demo model first."""
    from llmhost.config import ModelEntry
    from llmhost.ops.serve_models import build_pool, served

    if demo:
        demo_entry = ModelEntry(source=str(settings.model), pinned=True)
        settings = settings.model_copy(
            update={"models": {"llmhost-demo": demo_entry, **settings.models}, "model": None}
        )
    models = served(settings, refs, all_models)
    for _, _, s in models:
        if s.model and s.engine not in REMOTE_ENGINES:
            _check_model_files(s)
    pool = build_pool(settings, models)
    _warn_about_auth(settings)
    budget = pool.budget_bytes or 0
    gpus = "".join(f", GPU {i} {n / (1 << 30):.1f} GiB" for i, n in pool.gpu_budget.items())
    Console(stderr=True).print(
        f"OpenAI-compatible API at {'https' if settings.ssl_certfile else 'http'}://"
        f"{settings.host}:{settings.port}/v1 (models: {', '.join(pool.ids())}; memory budget "
        f"{budget / (1 << 30):.1f} GiB{gpus})",
        highlight=False,
    )
    serve_settings(settings, pool)


def _warn_about_auth(settings: Settings) -> None:
    err = Console(stderr=True, highlight=False)
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


def _check_model_files(settings: Settings) -> None:
    """Before anything listens: a model from the store must match its manifest (IntegrityError,
    exit 1), and an encrypted one needs a decrypt folder in memory (ConfigError, exit 2)."""
    from llmhost.store.in_memory import check_decrypt_dir, is_sealed
    from llmhost.store.loadcheck import check_before_load

    path = Path(settings.model or "").expanduser()
    if is_sealed(path):
        check_decrypt_dir(settings.decrypt_dir, allow_disk=settings.decrypt_allow_disk)
    checked = check_before_load(
        path,
        mode=settings.verify_on_load,
        hash_max_bytes=settings.verify_hash_max_mb << 20,
    )
    if checked is not None and checked.unhashed:
        ref = checked.manifest.ref
        Console(stderr=True).print(
            f"[yellow]{ref}: file sizes match the manifest; the sha256 of "
            f"{len(checked.unhashed)} file(s) over {settings.verify_hash_max_mb} MiB was not "
            f"checked at start.[/] Run `llmhost verify {ref}` once: a verified model is "
            "trusted until its files change.",
            highlight=False,
        )


def _plan_settings(path: Path, gpu: str | None, settings: Settings) -> dict:
    """Tensor-parallel degree (and context) from a saved `llmhost plan --json`."""
    import json

    try:
        plan = json.loads(path.read_text())
        rows = plan["gpus"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not the JSON of `llmhost plan --json` ({exc})") from exc
    if gpu is None:
        raise ConfigError("--from-plan needs --plan-gpu NAME (a row of the plan)")
    match = [r for r in rows if gpu.lower() in str(r.get("gpu", "")).lower()]
    if len(match) != 1:
        raise ConfigError(f"--plan-gpu {gpu!r} matches {len(match)} rows of the plan")
    need = match[0].get("gpus_needed")
    if not need:
        raise ConfigError(f"the plan says the model does not fit on {match[0]['gpu']}")
    return {"tensor_parallel": int(need), "ctx_size": settings.ctx_size or int(plan["ctx"])}


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        models: list[str] | None = typer.Argument(
            None,
            help="GGUF file, model folder, or a stored name:tag / name@channel; several are "
            "served together, each loaded when first asked for.",
        ),
        demo: bool = typer.Option(False, "--demo", help="Serve the built-in demo model."),
        all_models: bool = typer.Option(
            False, "--all-models", help="Serve every model in the store (loaded on demand)."
        ),
        memory_budget_mb: int | None = typer.Option(
            None, help="MiB the models may hold together; idle ones unload to make room."
        ),
        gpu_memory_budget_mb: int | None = typer.Option(
            None, help="MiB of each GPU the models placed there may hold [90% of it]."
        ),
        keep_alive: str | None = typer.Option(
            None, help="Unload a model idle this long: seconds or 30s, 5m, 2h, 1d."
        ),
        host: str | None = typer.Option(None, help="Address to listen on [127.0.0.1]."),
        port: int | None = typer.Option(None, help="Port [8080]."),
        engine: str | None = typer.Option(
            None, help="Engine: llamacpp, transformers, vllm, openai, fake [llamacpp]."
        ),
        model_name: str | None = typer.Option(None, help="Model id clients send."),
        threads: int | None = typer.Option(None, help="CPU threads [physical cores]."),
        ctx_size: int | None = typer.Option(
            None, "--ctx-size", "--ctx", help="Context tokens per sequence."
        ),
        parallel: int | None = typer.Option(
            None, help="Sequences decoded together [2 x cores, 4..16]."
        ),
        batch_size: int | None = typer.Option(None, help="Most tokens per decode step [512]."),
        max_queue: int | None = typer.Option(None, help="Requests that may wait [64]."),
        key_file: Path | None = typer.Option(None, help="Key of an encrypted model (0600)."),
        key_command: str | None = typer.Option(None, help="Command printing the model key."),
        log_format: str | None = typer.Option(None, help="text or json."),
        log_level: str | None = typer.Option(None, help="debug, info, warning, error."),
        no_auth: bool = typer.Option(
            False, "--no-auth", help="Accept requests without an API key or JWT."
        ),
        ssl_certfile: Path | None = typer.Option(None, help="Serve HTTPS with this certificate."),
        ssl_keyfile: Path | None = typer.Option(None, help="The certificate's private key."),
        metrics_port: int | None = typer.Option(
            None, help="Serve Prometheus /metrics on this port instead of the API port."
        ),
        metrics_auth: bool | None = typer.Option(
            None, "--metrics-auth/--metrics-public", help="Whether /metrics needs a key [public]."
        ),
        upstream_url: str | None = typer.Option(
            None, help="With --engine openai: the server to front, e.g. http://10.0.0.7:8000"
        ),
        tensor_parallel: int | None = typer.Option(None, help="vllm: GPUs per model [1]."),
        pipeline_parallel: int | None = typer.Option(None, help="vllm: pipeline stages [1]."),
        distributed_backend: str | None = typer.Option(None, help="vllm: mp or ray."),
        quantization: str | None = typer.Option(
            None, help="transformers: int8 or int4; vllm: awq, gptq, fp8, ..."
        ),
        dtype: str | None = typer.Option(
            None, help="transformers: auto, float32, bfloat16 or float16 [auto]."
        ),
        device: str | None = typer.Option(None, help="transformers: auto, cpu, cuda:N [auto]."),
        allow_pickle: bool | None = typer.Option(
            None, "--allow-pickle", help="transformers: accept pickle (.bin) weights."
        ),
        gpu_memory_utilization: float | None = typer.Option(None, help="vllm: GPU share [0.9]."),
        vllm_args: str | None = typer.Option(None, help="vllm: more `vllm serve` flags."),
        from_plan: Path | None = typer.Option(
            None, help="vllm: JSON of `llmhost plan --json`; its GPU count sets --tensor-parallel."
        ),
        plan_gpu: str | None = typer.Option(None, help="With --from-plan: which GPU row."),
        restart_on_crash: bool = typer.Option(
            False, "--restart-on-crash", help="Supervise: restart the server when it dies."
        ),
        verify_on_load: str | None = typer.Option(
            None,
            help="A stored model's checks at start: auto (sizes; sha256 unless verified since "
            "it changed or over 1 GiB), full (sha256 of every file), size [auto].",
        ),
        tool_parser: str | None = typer.Option(
            None,
            help="The model's tool-call format: hermes, llama3, mistral, deepseek or json "
            "[found from the chat template].",
        ),
        cors_origins: list[str] | None = typer.Option(
            None,
            "--cors-origins",
            help="Browser origin allowed to call the API (CORS), e.g. https://app.example.com, "
            "http://localhost:* (any port) or * (any); repeat or separate with commas. "
            "Default: none; with --demo, http://localhost:* and http://127.0.0.1:*.",
        ),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API. Clients need an API key
        (`llmhost keys create`) or a JWT, except with --no-auth or --demo."""
        if restart_on_crash:
            import sys

            from llmhost.observability.logs import setup_logging
            from llmhost.ops.supervise import supervise

            setup_logging(log_level or "info", "text")
            argv = [a for a in sys.argv[1:] if a != "--restart-on-crash"]
            raise typer.Exit(supervise([sys.executable, "-m", "llmhost", *argv]))
        refs = list(models or [])
        model = refs[0] if len(refs) == 1 else None
        settings = load_settings(
            model=model,
            memory_budget_mb=memory_budget_mb,
            gpu_memory_budget_mb=gpu_memory_budget_mb,
            keep_alive=keep_alive,
            host=host,
            port=port,
            engine=engine,
            model_name=model_name,
            threads=threads,
            ctx_size=ctx_size,
            parallel=parallel,
            batch_size=batch_size,
            max_queue=max_queue,
            model_key_file=key_file,
            model_key_command=key_command,
            log_format=log_format,
            log_level=log_level,
            auth=False if (no_auth or demo) else None,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            metrics_port=metrics_port,
            metrics_auth=metrics_auth,
            upstream_url=upstream_url,
            tensor_parallel=tensor_parallel,
            pipeline_parallel=pipeline_parallel,
            distributed_backend=distributed_backend,
            quantization=quantization,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            gpu_memory_utilization=gpu_memory_utilization,
            vllm_args=vllm_args,
            verify_on_load=verify_on_load,
            tool_parser=tool_parser,
            cors_origins=cors_origins or None,
        )
        if from_plan is not None:
            settings = settings.model_copy(update=_plan_settings(from_plan, plan_gpu, settings))
        from llmhost.security.tls import check_server_files

        check_server_files(settings.ssl_certfile, settings.ssl_keyfile)
        multi = len(refs) > 1 or all_models or bool(settings.models)
        if demo:
            if model and not multi:
                raise ConfigError("give either a model path or --demo, not both")
            from llmhost.store.demo import ensure_demo_model

            path = ensure_demo_model(settings.models_dir)
            update: dict[str, object] = {
                "model": str(path),
                "model_name": settings.model_name or "llmhost-demo",
            }
            if "cors_origins" not in settings.model_fields_set:  # not set by flag, env or file
                update["cors_origins"] = DEMO_CORS_ORIGINS
            settings = settings.model_copy(update=update)
            Console(stderr=True).print(
                "[yellow]Serving the demo model: random weights, its output is meaningless.[/] "
                "Pass a GGUF path to serve a real model.",
                highlight=False,
            )
        if multi:
            _serve_several(settings, refs, all_models, demo)
            return
        if (
            not demo
            and settings.model
            and settings.engine not in REMOTE_ENGINES
            and not Path(settings.model).expanduser().exists()
        ):
            from llmhost.store.registry import ModelStore

            try:
                found = ModelStore(settings.models_dir).resolve(settings.model)
            except LookupError as exc:
                if settings.engine == "vllm":  # a Hugging Face id: vLLM fetches it itself
                    found = None
                else:
                    raise ConfigError(f"model not found: {settings.model} ({exc})") from exc
            if found is not None:
                settings = settings.model_copy(
                    update={
                        "model": str(found),
                        "model_name": settings.model_name or settings.model.replace("@", ":"),
                    }
                )
        if settings.model and settings.engine not in REMOTE_ENGINES:
            _check_model_files(settings)
        _warn_about_auth(settings)
        Console(stderr=True).print(
            f"OpenAI-compatible API at {'https' if settings.ssl_certfile else 'http'}://"
            f"{settings.host}:{settings.port}/v1 "
            f"(model: {settings.model_name or Path(settings.model or '').stem})",
            highlight=False,
        )
        serve_settings(settings)
