"""`create_app`: the FastAPI application around one engine, with its lifecycle and handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from wsgiref.simple_server import WSGIServer

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost import __version__
from llmhost.api.admin_keys import router as admin_keys_router
from llmhost.api.audit import AuditMiddleware, InFlight, PromptPolicy
from llmhost.api.console.app import ConsoleMiddleware, build_console
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
    UsageMiddleware,
)
from llmhost.api.serving import Drain, OpenAIServing
from llmhost.audit.store import open_store
from llmhost.audit.writer import AuditWriter
from llmhost.config import Settings
from llmhost.engines.base import Engine
from llmhost.engines.loading import clean_stale
from llmhost.engines.pool import Pool
from llmhost.errors import ConfigError
from llmhost.observability.metrics import Metrics
from llmhost.security.auth import authenticator_from_settings
from llmhost.security.quota import Quota, QuotaPolicy, Quotas
from llmhost.security.ratelimit import RateLimiter
from llmhost.security.redact import Redactor
from llmhost.security.usage import UsageRecorder, open_usage_store

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


async def sweep_decrypted(settings: Settings, every: float = 600.0) -> None:
    """Periodically remove decrypted model copies left in tmpfs by killed processes."""
    while True:
        if settings.decrypt_dir.is_dir():
            for path in await asyncio.to_thread(clean_stale, settings.decrypt_dir):
                log.warning("removed stale decrypted model copy %s", path)
        await asyncio.sleep(every)


def serve_metrics(metrics: Metrics, host: str, port: int) -> WSGIServer:
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
    settings: Settings,
    *,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving `engine`, or every model of a pool (loaded on demand), as `settings`
    say (authentication, audit, limits, metrics: `Settings(auth=False, audit=False)` turns
    the first two off). The engine (the pool's pinned models) loads in the background after
    start-up so that /health answers at once and /ready reports loading; if loading fails,
    `on_fatal` is called (the CLI uses it to stop the server and exit non-zero). With `audit`
    on, every generation request leaves a record in `$LLMHOST_HOME/audit.db`."""
    pool = engine if isinstance(engine, Pool) else Pool.single(engine)
    name = engine.name if isinstance(engine, Engine) else "pool"
    metrics = Metrics(engine_name=name) if settings.metrics else None
    app = FastAPI(
        title="llmhost",
        version=__version__,
        description="OpenAI-compatible LLM service.",
        lifespan=_lifespan(on_fatal),
    )
    state = app.state
    state.settings = settings
    state.pool = pool
    state.created = int(time.time())  # when the models were registered (`created`)
    state.servings = {}
    # The default model's engine and serving once loaded (the one model of `serve MODEL`)
    state.engine = engine if isinstance(engine, Engine) else None
    state.serving = None
    state.ready = False
    state.load_error = None
    state.audit = _audit_writer(settings, metrics) if settings.audit else None
    state.drain = Drain()  # a graceful shutdown's deadline, for streams to end in-band
    state.in_flight = InFlight()
    state.metrics = metrics
    # /metrics lives on the main port unless a port of its own is configured.
    state.metrics_here = metrics is not None and not settings.metrics_port
    state.authenticator = authenticator_from_settings(settings) if settings.auth else None
    state.limiter = _rate_limiter(settings, pool)
    state.quota_policy = _quota_policy(settings)
    state.quotas = _quotas(settings, pool, state.quota_policy)
    state.usage = (
        UsageRecorder(open_usage_store(settings.audit_url, settings.usage_db))
        if settings.usage
        else None
    )
    _follow_pool(app, pool, settings.tool_parser)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_keys_router)
    _add_middleware(app, settings)
    # Outermost of all: /console has its own sessions and headers, apart from the API's edge.
    state.console_app = build_console(app)
    app.add_middleware(ConsoleMiddleware, console=state.console_app)
    return app


def _audit_writer(settings: Settings, metrics: Metrics | None) -> AuditWriter:
    """The audit log's writer as `settings` describe it, reporting to `metrics`."""
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
    return audit


def _rate_limiter(settings: Settings, pool: Pool) -> RateLimiter | None:
    """The rate limiter, or None when no limit can apply: none set, no model with its own,
    and no keys or tokens (which may carry limits of their own)."""
    model_limits = any(spec.rpm for spec in pool.specs)  # a model's own requests/minute
    if not (
        model_limits
        or settings.auth
        or settings.rate_limit_rps
        or settings.rate_limit_rpm
        or settings.rate_limit_tpm
    ):
        return None
    return RateLimiter(
        instance_rps=settings.rate_limit_rps,
        default_rpm=settings.rate_limit_rpm,
        default_tpm=settings.rate_limit_tpm,
        auth_failures_per_minute=settings.auth_failures_per_minute if settings.auth else 0,
        redis_url=settings.redis_url,
    )


def _quota_policy(settings: Settings) -> QuotaPolicy:
    default = Quota(
        settings.quota_tokens_per_day,
        settings.quota_tokens_per_month,
        settings.quota_requests_per_day,
    )
    users = {
        user: Quota(q.tokens_per_day, q.tokens_per_month, q.requests_per_day)
        for user, q in settings.quota_users.items()
    }
    return QuotaPolicy(default, users)


def _quotas(settings: Settings, pool: Pool, policy: QuotaPolicy) -> Quotas | None:
    """The quota counters, or None when no quota can apply: none in the settings, none for a
    model, and no keys (which may carry quotas of their own)."""
    if not (
        settings.auth
        or policy.user_default.is_set
        or policy.users
        or any(spec.quota != (None, None, None) for spec in pool.specs)
    ):
        return None
    return Quotas(settings.redis_url)


def _follow_pool(app: FastAPI, pool: Pool, tool_parser: str | None) -> None:
    """Keeps `app.state.servings` (and the default model's serving and engine) in step with
    the models the pool loads and unloads."""
    state = app.state

    def loaded(model_id: str, loaded_engine: Engine) -> None:
        state.servings[model_id] = OpenAIServing(
            loaded_engine, state.metrics, state.drain, tool_parser=tool_parser
        )
        if model_id == pool.default_id:
            state.serving, state.engine = state.servings[model_id], loaded_engine

    def unloading(model_id: str, _engine: Engine) -> None:
        state.servings.pop(model_id, None)

    pool.on_loaded, pool.on_unloading = loaded, unloading


def _lifespan(
    on_fatal: Callable[[], None] | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start-up and shutdown of an app `create_app` made: the models load in the background;
    at the end, requests still running are ended and recorded before the audit log closes."""

    async def load(app: FastAPI) -> None:
        state = app.state
        try:
            await state.pool.start()
        except Exception as exc:  # any load failure must reach /ready and the operator
            state.load_error = getattr(exc, "message", None) or str(exc) or repr(exc)
            log.error("model failed to load: %s", state.load_error)
            if on_fatal is not None:
                on_fatal()
            return
        state.ready = True
        log.info("ready: serving %s", ", ".join(state.pool.ids()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        settings, audit, metrics = state.settings, state.audit, state.metrics
        state.drain.loop = asyncio.get_running_loop()
        if audit is not None:
            audit.start()
        if state.usage is not None:
            state.usage.start()
        metrics_server = None
        if metrics is not None and settings.metrics_port:
            metrics_server = serve_metrics(metrics, settings.host, settings.metrics_port)
        loader = asyncio.create_task(load(app))
        state.loader = loader
        sweeper = asyncio.create_task(sweep_decrypted(settings))
        sampler = state.console_app.state.console.sampler
        charts = asyncio.create_task(sampler.run()) if sampler is not None else None
        try:
            yield
        finally:
            state.ready = False
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            sweeper.cancel()
            if charts is not None:
                charts.cancel()
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            if audit is not None:
                # Requests still running past the graceful timeout are ended here, so their
                # records are submitted before the writer drains: nothing is lost.
                await state.in_flight.finish()
                await audit.close()
                audit.store.close()
            if state.quotas is not None:
                await state.quotas.drain()
            if state.usage is not None:
                # after the requests in flight are ended, so their usage is in the last write
                await state.usage.close()
                await asyncio.to_thread(state.usage.store.close)
            authenticator = state.authenticator
            if authenticator is not None and authenticator.keys is not None:
                authenticator.keys.close()
            await state.pool.close()

    return lifespan


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """The edge of the app, innermost first: leases, quotas and usage, rate limits,
    authentication, the body limit, audit, metrics, the request id and its record, CORS
    outermost."""
    state = app.state
    pool, metrics = state.pool, state.metrics
    public = PUBLIC_PATHS
    if metrics is not None and not settings.metrics_auth:
        public = public | {METRICS_PATH}
    app.add_middleware(LeaseMiddleware, pool=pool)
    if state.quotas is not None or state.usage is not None:
        app.add_middleware(UsageMiddleware, quotas=state.quotas, usage=state.usage)
    if state.limiter is not None:
        app.add_middleware(
            RateLimitMiddleware, limiter=state.limiter, public=public, metrics=metrics
        )
    app.add_middleware(
        AuthMiddleware,
        authenticator=state.authenticator,
        public=public,
        metrics=metrics,
        limiter=state.limiter,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if state.audit is not None:
        app.add_middleware(AuditMiddleware, writer=state.audit, tracker=state.in_flight)
    if metrics is not None:
        metrics.watch_engine(
            lambda: e.health() if state.ready and (e := pool.loaded(pool.default_id)) else None
        )
        metrics.watch_models(pool.status)
        # our router's paths (FastAPI may include routers lazily) and the app's own (docs)
        routes = frozenset(
            p for r in (*router.routes, *app.routes) if isinstance(p := getattr(r, "path", ""), str)
        ) - {""}
        app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        # Outermost: a preflight is answered before auth, limits and the body limit, and every
        # response, the refusals of those included, carries the headers a page needs to read it.
        app.add_middleware(CorsMiddleware, origins=settings.cors_origins)
