"""`create_app`: the FastAPI application around one engine, with its lifecycle and handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from llmhost import __version__
from llmhost.api.audit import AuditMiddleware, InFlight, PromptPolicy
from llmhost.api.cors import CorsMiddleware
from llmhost.api.errors import install_error_handlers
from llmhost.api.metrics import METRICS_PATH, MetricsMiddleware
from llmhost.api.record import request_record
from llmhost.api.routes import router
from llmhost.api.security import (
    PUBLIC_PATHS,
    AuthMiddleware,
    BodyLimitMiddleware,
    RateLimitMiddleware,
)
from llmhost.api.serving import Drain, OpenAIServing
from llmhost.audit.store import open_store
from llmhost.audit.writer import AuditWriter
from llmhost.config import Settings
from llmhost.engines.base import Engine
from llmhost.engines.pool import Pool
from llmhost.errors import ConfigError
from llmhost.observability.metrics import Metrics
from llmhost.security.auth import authenticator_from_settings
from llmhost.security.ratelimit import RateLimiter
from llmhost.security.redact import Redactor
from llmhost.store import in_memory

log = logging.getLogger("llmhost.api")


class RequestIdMiddleware:
    """Gives each request an id (the client's X-Request-Id if sane), echoed back, and its
    `RequestRecord`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                if 0 < len(cand) <= 64 and cand.replace("-", "").isalnum():
                    rid = cand
                break
        rid = rid or uuid.uuid4().hex
        request_record(scope).request_id = rid

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


async def sweep_decrypted(settings: Settings, every: float = 600.0) -> None:
    """Periodically remove decrypted model copies left in tmpfs by killed processes."""
    while True:
        if settings.decrypt_dir.is_dir():
            for path in await asyncio.to_thread(in_memory.clean_stale, settings.decrypt_dir):
                log.warning("removed stale decrypted model copy %s", path)
        await asyncio.sleep(every)


def serve_metrics(metrics: Metrics, host: str, port: int):
    """/metrics on a port of its own, in a thread (prometheus-client's WSGI server)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


class LeaseMiddleware:
    """Releases the model leases a request took (routes.serving_for) once its response is
    over, a stream's last byte or a client gone included."""

    def __init__(self, app: ASGIApp, pool: Pool):
        self.app = app
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            leases = request_record(scope).leases
            for model_id in leases:
                self.pool.release(model_id)
            leases.clear()


def create_app(
    engine: Engine | Pool,
    settings: Settings | None = None,
    *,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving `engine`, or every model of a pool (loaded on demand). The engine (the
    pool's pinned models) loads in the background after start-up so that /health answers at
    once and /ready reports loading; if loading fails, `on_fatal` is called (the CLI uses it to
    stop the server and exit non-zero). With settings (and `audit` on), every generation
    request leaves a record in `$LLMHOST_HOME/audit.db`."""
    pool = engine if isinstance(engine, Pool) else Pool.single(engine)
    name = engine.name if isinstance(engine, Engine) else "pool"
    metrics = Metrics(engine_name=name) if settings is None or settings.metrics else None
    audit = None
    if settings is not None and settings.audit:
        policy = PromptPolicy(
            mode=settings.audit_prompt_mode,
            redactor=Redactor(ip=settings.audit_redact_ip),
            max_chars=settings.audit_prompt_max_chars,
        )
        audit = AuditWriter(
            open_store(
                settings.audit_url,
                settings.audit_db,
                key_file=settings.audit_key_path,
                head_file=settings.audit_head_path,
                writer=True,
            ),
            retention_days=settings.audit_retention_days,
            on_write=metrics.observe_audit_write if metrics is not None else None,
            on_drop=metrics.audit_dropped.inc if metrics is not None else None,
            prepare=policy.prepare,
        )
        if metrics is not None:
            metrics.watch_audit_queue(audit.queue.qsize)

    servings: dict[str, OpenAIServing] = {}

    def loaded(model_id: str, loaded_engine: Engine) -> None:
        servings[model_id] = OpenAIServing(
            loaded_engine,
            metrics,
            app.state.drain,
            tool_parser=settings.tool_parser if settings is not None else None,
        )
        if model_id == pool.default_id:
            app.state.serving, app.state.engine = servings[model_id], loaded_engine

    def unloading(model_id: str, _engine: Engine) -> None:
        servings.pop(model_id, None)

    pool.on_loaded, pool.on_unloading = loaded, unloading

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                await pool.start()
            except Exception as exc:  # any load failure must reach /ready and the operator
                app.state.load_error = getattr(exc, "message", None) or str(exc) or repr(exc)
                log.error("model failed to load: %s", app.state.load_error)
                if on_fatal is not None:
                    on_fatal()
                return
            app.state.ready = True
            log.info("ready: serving %s", ", ".join(pool.ids()))

        app.state.drain.loop = asyncio.get_running_loop()
        if audit is not None:
            audit.start()
        metrics_server = None
        if metrics is not None and settings is not None and settings.metrics_port:
            metrics_server = serve_metrics(metrics, settings.host, settings.metrics_port)
        loader = asyncio.create_task(load())
        app.state.loader = loader
        sweeper = asyncio.create_task(sweep_decrypted(settings)) if settings else None
        try:
            yield
        finally:
            app.state.ready = False
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            if sweeper is not None:
                sweeper.cancel()
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            if audit is not None:
                # Requests still running past the graceful timeout are ended here, so their
                # records are submitted before the writer drains: nothing is lost.
                await in_flight.finish()
                await audit.close()
                audit.store.close()
            if authenticator is not None and authenticator.keys is not None:
                authenticator.keys.close()
            await pool.close()

    app = FastAPI(
        title="llmhost",
        version=__version__,
        description="OpenAI-compatible LLM service.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.created = int(time.time())  # when the models were registered (`created`)
    app.state.servings = servings
    # The default model's engine and serving once loaded (the one model of `serve MODEL`)
    app.state.engine = engine if isinstance(engine, Engine) else None
    app.state.serving = None
    app.state.ready = False
    app.state.load_error = None
    app.state.audit = audit
    app.state.drain = Drain()  # a graceful shutdown's deadline, for streams to end in-band
    in_flight = InFlight()
    app.state.in_flight = in_flight
    app.state.limiter = None
    app.state.metrics = metrics
    # /metrics lives on the main port unless a port of its own is configured.
    app.state.metrics_here = metrics is not None and not (settings and settings.metrics_port)
    public = PUBLIC_PATHS
    if metrics is not None and not (settings and settings.metrics_auth):
        public = public | {METRICS_PATH}
    authenticator = (
        authenticator_from_settings(settings) if settings is not None and settings.auth else None
    )
    app.state.authenticator = authenticator
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(LeaseMiddleware, pool=pool)
    model_limits = any(spec.rpm for spec in pool.specs)  # a model's own requests/minute
    if model_limits or (
        settings is not None
        and (
            settings.auth  # keys and tokens may carry limits of their own
            or settings.rate_limit_rps
            or settings.rate_limit_rpm
            or settings.rate_limit_tpm
        )
    ):
        app.state.limiter = RateLimiter(
            instance_rps=settings.rate_limit_rps if settings else 0,
            default_rpm=settings.rate_limit_rpm if settings else 0,
            default_tpm=settings.rate_limit_tpm if settings else 0,
            auth_failures_per_minute=(
                settings.auth_failures_per_minute if settings and settings.auth else 0
            ),
            redis_url=settings.redis_url if settings else None,
        )
        app.add_middleware(
            RateLimitMiddleware, limiter=app.state.limiter, public=public, metrics=metrics
        )
    app.add_middleware(
        AuthMiddleware,
        authenticator=authenticator,
        public=public,
        metrics=metrics,
        limiter=app.state.limiter,
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_request_bytes if settings else 4 << 20
    )
    if audit is not None:
        app.add_middleware(AuditMiddleware, writer=audit, tracker=in_flight)
    if metrics is not None:
        metrics.watch_engine(
            lambda: e.health() if app.state.ready and (e := pool.loaded(pool.default_id)) else None
        )
        metrics.watch_models(pool.status)
        # our router's paths (FastAPI may include routers lazily) and the app's own (docs)
        routes = frozenset(
            p for r in (*router.routes, *app.routes) if isinstance(p := getattr(r, "path", ""), str)
        ) - {""}
        app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    app.add_middleware(RequestIdMiddleware)
    if settings is not None and settings.cors_origins:
        # Outermost: a preflight is answered before auth, limits and the body limit, and every
        # response, the refusals of those included, carries the headers a page needs to read it.
        app.add_middleware(CorsMiddleware, origins=settings.cors_origins)
    return app
