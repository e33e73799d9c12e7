"""A router in front of several OpenAI-compatible upstreams (llmhost replicas, a blue and a
green deployment, or any other server): each request goes to the healthy upstream with the
fewest requests outstanding, among those with traffic weight; an upstream that fails its
health checks is taken out and comes back when it answers again; a request whose upstream
fails before the first byte of its response is retried on another one, so clients never see
a replica die unless it dies mid-stream.

Each upstream's models come from its readiness report, so a request goes only to a healthy
upstream that serves the model it names (a model no upstream serves is a 404 listing those
that are served), and `/v1/models` is the union of the upstreams' lists: a fleet can host
different models on different machines behind one URL.

Streaming responses pass through chunk by chunk. `/router/status` reports every upstream (its
URL without credentials: no user or password, no query value); `PUT /router/weights` shifts
traffic, as blue-green deployments do. With an admin token configured both need it; without
one, weights cannot be changed and the status is public. `/console` shows the fleet in a
browser (upstreams, their models, live charts, weights) to whoever logs in with the token.
Request bodies are read up to a limit (413 past it), and every failure answers an
OpenAI-style JSON error."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmhost.api.bodies import read_body_within
from llmhost.api.errors import llmhost_error_response, unexpected_error_handler
from llmhost.errors import (
    AuthenticationError,
    InvalidRequest,
    LlmhostError,
    ModelNotFound,
    NotFound,
    ServiceUnavailable,
)

log = logging.getLogger("llmhost.router")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
RETRYABLE_STATUS = frozenset({502, 503, 504})
WINDOW = 512  # recent outcomes kept per upstream for error ratio and latency
MAX_BODY = 32 << 20  # a request body the router holds (it must, to retry it elsewhere)
WEIGHTS_BODY_MAX = 1 << 20  # {"name": weight, ...}: a few hundred bytes in practice
HIDDEN = "***"
MAX_MODELS = 4096  # model ids kept per upstream
THREAD_JSON = 64 << 10  # bodies larger than this are parsed for their model in a thread


def redact_url(url: str) -> str:
    """`url` fit to show or log: user and password gone, every query value masked (any of
    them may be a key), no fragment."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rpartition('@')[2]}"
    shown = urlencode([(k, HIDDEN) for k, _ in query], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, shown, ""))


@dataclass
class Upstream:
    name: str
    url: str = field(repr=False)  # may hold credentials: show `shown`
    weight: float = 1.0
    healthy: bool = False  # in after its first good health check
    outstanding: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0  # summed over every request, for the mean of an interval
    consecutive_failures: int = 0
    recent: deque[tuple[float, bool, float]] = field(
        default_factory=lambda: deque(maxlen=WINDOW)
    )  # (t, ok, seconds)
    models: frozenset[str] = frozenset()  # what it serves, from /ready; empty: not known
    shown: str = field(init=False)
    _base: str = field(init=False, repr=False)
    _params: list[tuple[str, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.shown = redact_url(self.url)
        parts = urlsplit(self.url)
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).rstrip("/")
        self._params = parse_qsl(parts.query, keep_blank_values=True)

    def target(self, path: str) -> str:
        """The URL of `path` on this upstream (its own query goes in `params`)."""
        return self._base + path

    def params(self, extra: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
        """The request's query parameters and the upstream URL's own, which win (a client
        cannot replace a key the upstream URL carries)."""
        own = {k for k, _ in self._params}
        return (*((k, v) for k, v in extra if k not in own), *self._params)

    def record(self, ok: bool, seconds: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.seconds += seconds
        self.recent.append((time.monotonic(), ok, seconds))

    def window(self, seconds: float) -> tuple[int, float, float]:
        """(requests, error ratio, p99 latency) over the last `seconds`."""
        since = time.monotonic() - seconds
        got = [(ok, s) for t, ok, s in self.recent if t >= since]
        if not got:
            return 0, 0.0, 0.0
        lat = sorted(s for _, s in got)
        errors = sum(1 for ok, _ in got if not ok)
        return len(got), errors / len(got), lat[min(len(lat) - 1, int(0.99 * len(lat)))]

    def status(self) -> dict[str, Any]:
        n, ratio, p99 = self.window(60)
        return {
            "name": self.name,
            "url": self.shown,
            "weight": self.weight,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "models": sorted(self.models),
            "requests": self.requests,
            "errors": self.errors,
            "last_minute": {
                "requests": n,
                "error_ratio": round(ratio, 4),
                "p99_seconds": round(p99, 4),
            },
        }


class Pool:
    def __init__(
        self,
        upstreams: list[Upstream],
        *,
        check_every: float = 1.0,
        fail_after: int = 2,
        check_timeout: float = 2.0,
    ):
        if not upstreams:
            raise InvalidRequest("the router needs at least one upstream")
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise InvalidRequest("upstream names must be unique")
        self.upstreams = upstreams
        self.check_every = check_every
        self.fail_after = fail_after
        self.check_timeout = check_timeout
        self._rr = itertools.count()

    def set_weights(self, wanted: dict[str, Any]) -> None:
        """Sets the weights of the upstreams `wanted` names, all or none: InvalidRequest for
        a weight that is not a number from 0 to 1000, NotFound for an unknown name."""
        for name, w in wanted.items():
            if not isinstance(w, int | float) or isinstance(w, bool) or not 0 <= w <= 1000:
                raise InvalidRequest(f"weight of {name!r} must be a number 0..1000")
            self.get(name)
        for name, w in wanted.items():
            self.get(name).weight = float(w)
        log.info("weights now %s", {u.name: u.weight for u in self.upstreams})

    def get(self, name: str) -> Upstream:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise NotFound(f"no upstream named {name!r}")

    def served(self) -> frozenset[str]:
        """Every model some upstream reports, healthy or not."""
        return frozenset().union(*(u.models for u in self.upstreams))

    def pick(self, exclude: set[str], model: str | None = None) -> Upstream | None:
        live = [u for u in self.upstreams if u.healthy and u.weight > 0 and u.name not in exclude]
        if model is not None:  # those that serve it, or may (their models are not known)
            live = [u for u in live if not u.models or model in u.models]
        if not live:
            return None
        # least outstanding relative to weight; rotate among equals so idle replicas share
        start = next(self._rr)
        order = live[start % len(live) :] + live[: start % len(live)]
        return min(order, key=lambda u: (u.outstanding + 1) / u.weight)

    async def check(self, client: httpx.AsyncClient, u: Upstream) -> bool:
        try:
            r = await client.get(u.target("/ready"), params=u.params(), timeout=self.check_timeout)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            u.models = _ready_models(r)
        if ok:
            if not u.healthy:
                log.info("upstream %s (%s) is in", u.name, u.shown)
            u.healthy, u.consecutive_failures = True, 0
        else:
            u.consecutive_failures += 1
            if u.healthy and u.consecutive_failures >= self.fail_after:
                log.warning("upstream %s (%s) is out: health checks fail", u.name, u.shown)
                u.healthy = False
        return ok

    def mark_failed(self, u: Upstream) -> None:
        """A connection to `u` failed: take it out now; health checks bring it back."""
        if u.healthy:
            log.warning("upstream %s (%s) is out: connection failed", u.name, u.shown)
        u.healthy = False
        u.consecutive_failures = max(u.consecutive_failures, self.fail_after)

    async def run_checks(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.gather(*(self.check(client, u) for u in self.upstreams))
            await asyncio.sleep(self.check_every)


def _ready_models(r: httpx.Response) -> frozenset[str]:
    """The models a readiness report names: llmhost's `model` (one model) or `models`."""
    try:
        body = r.json()
    except ValueError:
        return frozenset()
    if not isinstance(body, dict):
        return frozenset()
    found = [body.get("model")] + [
        m.get("id") for m in body.get("models") or () if isinstance(m, dict)
    ]
    return frozenset(m for m in found[:MAX_MODELS] if isinstance(m, str) and m)


def _body_model(body: bytes) -> str | None:
    if b'"model"' not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the upstream answers the malformed body
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


async def model_of(request: Request, body: bytes) -> str | None:
    """The `model` a JSON request body names, if any; a large body is searched and parsed in
    a thread, off the event loop."""
    if request.method != "POST":
        return None
    if len(body) > THREAD_JSON:
        return await asyncio.to_thread(_body_model, body)
    return _body_model(body)


def _forward_headers(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, never read whole
    first."""
    body = await read_body_within(
        request.receive, limit, request.headers.get("content-length"), "router --max-body-mb"
    )
    if body is None:
        raise ClientDisconnect()
    return body


class RouterApp:
    """The router's handlers over one pool of upstreams and the HTTP client they share."""

    def __init__(
        self,
        pool: Pool,
        *,
        admin_token: str | None,
        retries: int,
        timeout: float,
        max_body: int,
    ):
        self.pool = pool
        self.admin_token = admin_token
        self.retries = retries
        self.timeout = timeout
        self.max_body = max_body
        self.client: httpx.AsyncClient  # made when the app starts (its lifespan)
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []  # jobs while up

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        pool = self.pool
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0), limits=limits)
        self.client = client
        await asyncio.gather(*(pool.check(client, u) for u in pool.upstreams))
        tasks = [asyncio.create_task(pool.run_checks(client))]
        tasks += [asyncio.create_task(job()) for job in self.background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.aclose()

    async def proxy(self, request: Request) -> Response:
        client, pool = self.client, self.pool
        body = await read_body(request, self.max_body)
        headers = _forward_headers(request)
        model = await model_of(request, body)
        served = pool.served()
        if model is not None and all(u.models for u in pool.upstreams) and model not in served:
            raise ModelNotFound(
                f"The model '{model}' does not exist; the upstreams serve: "
                + ", ".join(sorted(served)),
                param="model",
            )
        tried: set[str] = set()
        last_error = "no healthy upstream" + (f" serves {model!r}" if model else "")
        for _ in range(self.retries + 1):
            u = pool.pick(tried, model)
            if u is None:
                break
            tried.add(u.name)
            t0 = time.perf_counter()
            u.outstanding += 1
            released = False

            def release(ok: bool, up: Upstream = u, start: float = t0) -> None:
                nonlocal released
                if not released:
                    released = True
                    up.outstanding -= 1
                    up.record(ok, time.perf_counter() - start)

            try:
                req = client.build_request(
                    request.method,
                    u.target(request.url.path),
                    params=u.params(request.query_params.multi_items()),
                    headers=headers,
                    content=body,
                )
                resp = await client.send(req, stream=True)
            except httpx.TransportError as exc:  # nothing reached the client: try another
                release(False)
                pool.mark_failed(u)
                last_error = f"{u.name}: {type(exc).__name__}"
                continue
            if resp.status_code in RETRYABLE_STATUS and len(tried) <= self.retries:
                await resp.aclose()
                release(False)
                last_error = f"{u.name}: HTTP {resp.status_code}"
                continue
            return self._relay(resp, u, release)
        raise ServiceUnavailable(f"no upstream could answer ({last_error})", retry_after=1)

    def _relay(
        self, resp: httpx.Response, up: Upstream, release: Callable[[bool], None]
    ) -> StreamingResponse:
        """The upstream's response passed on chunk by chunk; `release` once it is over."""

        async def body_iter() -> AsyncIterator[bytes]:
            ok = resp.status_code < 500
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.TransportError:
                ok = False  # the upstream died mid-stream: the client sees the cut
                self.pool.mark_failed(up)
                raise
            finally:
                await resp.aclose()
                release(ok)

        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers["x-llmhost-upstream"] = up.name
        return StreamingResponse(body_iter(), status_code=resp.status_code, headers=out_headers)

    def check_admin(self, request: Request) -> None:
        if self.admin_token is None:
            raise NotFound("router administration is off (no admin token configured)")
        got = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(got.encode(), self.admin_token.encode()):
            raise AuthenticationError("admin token required")

    async def status(self, request: Request) -> Response:
        if self.admin_token is not None:
            self.check_admin(request)
        return JSONResponse({"upstreams": [u.status() for u in self.pool.upstreams]})

    async def weights(self, request: Request) -> Response:
        self.check_admin(request)
        pool = self.pool
        body = await read_body(request, WEIGHTS_BODY_MAX)
        try:
            wanted = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InvalidRequest('body must be JSON: {"name": weight, ...}') from exc
        if not isinstance(wanted, dict) or not wanted:
            raise InvalidRequest("body must be an object of upstream name -> weight")
        pool.set_weights(wanted)
        return JSONResponse({"upstreams": [u.status() for u in pool.upstreams]})

    async def models(self, request: Request) -> Response:
        """The union of the healthy upstreams' /v1/models, asked with the client's headers."""
        client = self.client
        live = [u for u in self.pool.upstreams if u.healthy and u.weight > 0]
        if not live:
            raise ServiceUnavailable("no healthy upstream", retry_after=1)
        headers = _forward_headers(request)

        async def ask(u: Upstream) -> httpx.Response | None:
            try:
                return await client.get(
                    u.target("/v1/models"),
                    params=u.params(request.query_params.multi_items()),
                    headers=headers,
                    timeout=10,
                )
            except httpx.HTTPError:
                return None

        got = [r for r in await asyncio.gather(*(ask(u) for u in live)) if r is not None]
        ok = [r for r in got if r.status_code == 200]
        if not ok:
            if got:  # e.g. a 401 for a client without a key: the upstream's own answer
                return Response(got[0].content, got[0].status_code, media_type="application/json")
            raise ServiceUnavailable("no upstream answered /v1/models", retry_after=1)
        data: dict[str, dict[str, Any]] = {}
        for r in ok:
            try:
                items = r.json().get("data") or []
            except (ValueError, AttributeError):
                continue
            for m in items[:MAX_MODELS]:
                if isinstance(m, dict) and isinstance(m.get("id"), str):
                    data.setdefault(m["id"], m)
        return JSONResponse({"object": "list", "data": list(data.values())})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        live = [u.name for u in self.pool.upstreams if u.healthy and u.weight > 0]
        return JSONResponse(
            {"status": "ready" if live else "no upstream", "upstreams": live},
            status_code=200 if live else 503,
        )


def create_router_app(
    pool: Pool,
    *,
    admin_token: str | None = None,
    retries: int = 2,
    timeout: float = 600.0,
    max_body: int = MAX_BODY,
    console: bool = True,
    secure_cookies: bool = False,
) -> Starlette:
    """The router as an ASGI app. `retries`: other upstreams tried when one fails before its
    response starts; `max_body`: the largest request body passed on (413 past it);
    `console`: the fleet's page at /console, for whoever holds the admin token."""
    r = RouterApp(
        pool, admin_token=admin_token, retries=retries, timeout=timeout, max_body=max_body
    )
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(
        routes=[
            Route("/router/status", r.status, methods=["GET"]),
            Route("/router/weights", r.weights, methods=["PUT"]),
            Route("/health", r.health, methods=["GET"]),
            Route("/ready", r.ready, methods=["GET"]),
            Route("/v1/models", r.models, methods=["GET"]),
            Route("/{path:path}", r.proxy, methods=methods),
        ],
        lifespan=r.lifespan,
        exception_handlers={
            LlmhostError: llmhost_error_response,  # type: ignore[dict-item]
            Exception: unexpected_error_handler(log, "router"),
        },
    )
    if console:
        from llmhost.api.console.app import ConsoleMiddleware  # the console builds on this
        from llmhost.api.console.fleet import build_fleet_console

        fleet = build_fleet_console(r, secure_cookies=secure_cookies)
        app.add_middleware(ConsoleMiddleware, console=fleet)
    return app


def parse_upstream(text: str, index: int) -> Upstream:
    """`URL` or `NAME=URL`."""
    name, sep, url = text.partition("=")
    if not sep:
        name, url = f"u{index}", text
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest(f"upstream {text!r} must be an http(s) URL")
    return Upstream(name=name, url=url)
