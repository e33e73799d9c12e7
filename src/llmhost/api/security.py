"""Authentication at the edge of the app: every route but the public ones needs a Bearer API
key or JWT; the Principal lands in the request state for the handlers, limits and audit."""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from llmhost.errors import LlmhostError, RateLimited
from llmhost.observability.metrics import Metrics
from llmhost.security.auth import ANONYMOUS, Authenticator
from llmhost.security.ratelimit import RateLimiter

log = logging.getLogger("llmhost.auth")
PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


async def send_error(send: Send, exc: LlmhostError, headers: dict[str, str] | None = None):
    body = json.dumps(exc.to_openai()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator | None,
        public: frozenset[str] = PUBLIC_PATHS,
        metrics: Metrics | None = None,
    ):
        self.app = app
        self.authenticator = authenticator  # None: authentication off (--no-auth, --demo)
        self.public = public
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.authenticator is None:
            state["principal"] = ANONYMOUS
        elif scope["path"] not in self.public:
            header = None
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    header = v.decode("latin-1")
                    break
            try:
                state["principal"] = self.authenticator.authenticate(header)
            except LlmhostError as exc:
                if self.metrics is not None:
                    self.metrics.auth_failures.inc()
                client = (scope.get("client") or ("?",))[0]
                log.warning("authentication failed from %s: %s", client, exc.message)
                await send_error(send, exc, {"WWW-Authenticate": 'Bearer realm="llmhost"'})
                return
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """429 with Retry-After and X-RateLimit-* when a limit is reached; X-RateLimit-* on every
    admitted response; the tokens a response used are charged when it ends."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        public: frozenset[str] = PUBLIC_PATHS,
        metrics: Metrics | None = None,
    ):
        self.app = app
        self.limiter = limiter
        self.public = public
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        principal = state.get("principal", ANONYMOUS)
        decision = await self.limiter.admit(principal)
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(decision.scope).inc()
            await send_error(
                send,
                RateLimited(f"rate limit reached ({decision.reason}); retry later"),
                decision.headers(),
            )
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start" and extra:
                message.setdefault("headers", []).extend(extra)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            usage = (state.get("audit") or {}).get("usage") or {}
            used = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            if used:
                await self.limiter.charge_tokens(principal, used)
