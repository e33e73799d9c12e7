"""The edge of the app: request size limits (before a body is read whole), authentication
(every route but the public ones needs a Bearer API key or JWT; the Principal lands in the
request's `RequestRecord` for the handlers, limits and audit), a per-client-IP limit on failed
authentication that refuses before any credential is checked, rate limits, and quotas with
the usage accounting beside them."""

from __future__ import annotations

import json
import logging
import math

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost.api.bodies import read_body_within, replaying
from llmhost.api.record import RequestRecord, request_record
from llmhost.errors import (
    LlmhostError,
    RateLimited,
    UriTooLong,
)
from llmhost.observability.metrics import Metrics
from llmhost.security.auth import ANONYMOUS, Authenticator, Principal
from llmhost.security.quota import Quota, QuotaExceeded, QuotaPolicy, Quotas
from llmhost.security.ratelimit import RateLimiter
from llmhost.security.usage import UsageRecorder

log = logging.getLogger("llmhost.auth")
PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
# A Principal the app itself put in the ASGI scope of a request it makes in-process (the
# console's playground, for the admin logged in there). An HTTP server never sets this key, so
# no client can: the credential of such a request is the console session already checked.
TRUSTED_PRINCIPAL = "llmhost.trusted_principal"


async def send_error(send: Send, exc: LlmhostError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(exc.to_openai()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


MAX_URL_BYTES = 8192  # path and query string together, as nginx's default header buffer
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A refused body is not read on to keep the connection: it is closed after the answer.
_CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    """Refuses a body over `max_bytes` with 413 before it is read whole: at once when its
    Content-Length says so, else as soon as the bytes received pass the limit. A URL over
    8 KiB gets 414. The body, once within the limit, is handed on in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if url_bytes > MAX_URL_BYTES:
            await send_error(
                send, UriTooLong(f"the URL is longer than {MAX_URL_BYTES} bytes"), _CLOSE
            )
            return
        if self.max_bytes <= 0 or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                declared = v
                break
        try:
            body = await read_body_within(receive, self.max_bytes, declared, "max_request_bytes")
        except LlmhostError as exc:
            await send_error(send, exc, _CLOSE)
            return
        if body is None:  # the client went away
            return
        await self.app(scope, replaying(body, receive), send)


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator | None,
        public: frozenset[str] = PUBLIC_PATHS,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
    ):
        self.app = app
        self.authenticator = authenticator  # None: authentication off (--no-auth, --demo)
        self.public = public
        self.metrics = metrics
        self.limiter = limiter  # refuses clients with too many recent failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = request_record(scope)
        trusted = scope.get(TRUSTED_PRINCIPAL)
        if isinstance(trusted, Principal):
            rec.principal = trusted
        elif self.authenticator is None:
            rec.principal = ANONYMOUS
        elif scope["path"] not in self.public:
            client = str((scope.get("client") or ("?",))[0])
            if self.limiter is not None:
                blocked = await self.limiter.auth_failures_exceeded(client)
                if blocked is not None:
                    if self.metrics is not None:
                        self.metrics.rate_limited.labels(blocked.scope).inc()
                    await send_error(
                        send,
                        RateLimited(
                            f"too many failed authentications from {client} ({blocked.reason}); "
                            "retry later",
                            code="auth_failures",
                        ),
                        blocked.headers(),
                    )
                    return
            header = None
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    header = v.decode("latin-1")
                    break
            try:
                rec.principal = self.authenticator.authenticate(header)
            except LlmhostError as exc:
                if self.metrics is not None:
                    self.metrics.auth_failures.inc()
                if self.limiter is not None:
                    await self.limiter.note_auth_failure(client)
                log.warning("authentication failed from %s: %s", client[:64], exc.message[:200])
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
        rec = request_record(scope)
        principal = rec.principal if rec.principal is not None else ANONYMOUS
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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and extra:
                message.setdefault("headers", []).extend(extra)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            used = rec.tokens().total_tokens
            if used:
                await self.limiter.charge_tokens(principal, used)


async def admit_quota(
    state: State,
    rec: RequestRecord,
    model_id: str,
    model_quota: tuple[int | None, int | None, int | None],
) -> None:
    """Count a generation request against the quotas of its key, user and model, or refuse
    it (429, code quota_exceeded, naming the quota and when it resets)."""
    quotas: Quotas | None = state.quotas
    if quotas is None:
        return
    policy: QuotaPolicy = state.quota_policy
    principal = rec.principal if rec.principal is not None else ANONYMOUS
    for_model = Quota(*model_quota) if model_quota != (None, None, None) else Quota()
    targets = policy.targets(
        principal.key_id, principal.quota, principal.user_id, model_id, for_model
    )
    if not targets:
        return
    result = await quotas.admit(targets)
    if isinstance(result, QuotaExceeded):
        metrics: Metrics | None = state.metrics
        if metrics is not None:
            metrics.rate_limited.labels("quota").inc()
        raise RateLimited(
            result.message, retry_after=math.ceil(result.retry_after), code="quota_exceeded"
        )
    rec.quota = result


class UsageMiddleware:
    """When a generation request ends (last byte, error or client gone), charges the tokens
    it used to its quotas and adds it to the usage accounts, as the tokens/minute limit is
    charged: from the request record's usage."""

    def __init__(self, app: ASGIApp, quotas: Quotas | None, usage: UsageRecorder | None):
        self.app = app
        self.quotas = quotas
        self.usage = usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = request_record(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            if rec.served_model:
                used = rec.tokens()
                if self.usage is not None:
                    principal = rec.principal if rec.principal is not None else ANONYMOUS
                    self.usage.add(
                        principal.key_id,
                        principal.user_id,
                        rec.served_model,
                        used.prompt_tokens,
                        used.completion_tokens,
                        at=rec.served_at,
                    )
                if rec.quota is not None and self.quotas is not None:
                    await self.quotas.charge_soon(rec.quota, used.total_tokens)
