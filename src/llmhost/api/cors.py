"""CORS for browser code on other origins: preflights are answered before authentication, rate
limits and the body limit (a preflight carries no credentials), and every response to an
allowed origin, refusals and streams included, carries the headers that let the page read it.
Origins are matched by parsing them (`config.parse_origin`), never with a regex."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Scope, Send

from llmhost.config import ANY_PORT, normalize_origin_entry, parse_origin
from llmhost.errors import ConfigError

ALLOW_METHODS = ("GET", "POST", "OPTIONS", "DELETE")
# What fetch() and the openai JS SDK send; any other x-stainless-* header the SDK adds in a
# later version passes too.
ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "x-request-id",
    "idempotency-key",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
)
_SDK_PREFIX = "x-stainless-"
# Response headers page scripts may read: the request id, and what the rate limits send.
EXPOSE_HEADERS = (
    "x-request-id",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
MAX_AGE = 600


def is_preflight(scope: Scope) -> bool:
    """A browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {k for k, _ in scope.get("headers", ())}
    return b"origin" in names and b"access-control-request-method" in names


class OriginPolicy:
    """The origins `cors_origins` allows: `*` (any), exact origins, and scheme://host with any
    port (`http://localhost:*`)."""

    def __init__(self, entries: Iterable[str]):
        self.any_origin = False
        self.exact: set[tuple[str, str, int | str | None]] = set()
        self.any_port: set[tuple[str, str]] = set()
        for entry in entries:
            try:
                normal = normalize_origin_entry(entry)
            except ValueError as exc:
                raise ConfigError(f"cors_origins: {exc}") from None
            if normal == "*":
                self.any_origin = True
                continue
            scheme, host, port = parse_origin(normal, port_wildcard=True)
            if port == ANY_PORT:
                self.any_port.add((scheme, host))
            else:
                self.exact.add((scheme, host, port))

    def allows(self, origin: str) -> bool:
        if self.any_origin:
            return True
        try:
            scheme, host, port = parse_origin(origin)
        except ValueError:  # "null" (file://, sandboxed frames) or garbage
            return False
        return (scheme, host, port) in self.exact or (scheme, host) in self.any_port


def _allowed_header(name: str) -> bool:
    return name in ALLOW_HEADERS or name.startswith(_SDK_PREFIX)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORSMiddleware with origins matched by `OriginPolicy`, preflights answered
    204, and no Access-Control-* header at all for an origin that is not allowed. Credentials
    (cookies) are never allowed: clients authenticate with the Authorization header."""

    def __init__(self, app: ASGIApp, origins: Iterable[str]):
        self.policy = OriginPolicy(origins)
        super().__init__(
            app,
            allow_origins=("*",) if self.policy.any_origin else (),
            allow_methods=ALLOW_METHODS,
            allow_headers=ALLOW_HEADERS,
            allow_credentials=False,
            expose_headers=EXPOSE_HEADERS,
            max_age=MAX_AGE,
        )

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.allows(origin)

    def preflight_response(self, request_headers: Headers) -> Response:
        origin = request_headers["origin"]
        asked = [
            h.strip().lower()
            for h in request_headers.get("access-control-request-headers", "").split(",")
            if h.strip()
        ]
        # Private Network Access: a public page calling this server on a private address.
        # Granted to origins named one by one, never to `*`.
        private = request_headers.get("access-control-request-private-network") is not None
        refused = [
            what
            for what, ok in (
                ("origin", self.is_allowed_origin(origin)),
                ("method", request_headers["access-control-request-method"] in ALLOW_METHODS),
                ("headers", all(_allowed_header(h) for h in asked)),
                ("private-network", not private or not self.policy.any_origin),
            )
            if not ok
        ]
        vary = self.preflight_headers["Vary"]
        if refused:
            return PlainTextResponse(
                "Disallowed CORS " + ", ".join(refused), status_code=400, headers={"Vary": vary}
            )
        headers = dict(self.preflight_headers)  # methods, max age, the headers listed, Vary
        if self.preflight_explicit_allow_origin:
            headers["Access-Control-Allow-Origin"] = origin
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(asked)
        if private:
            headers["Access-Control-Allow-Private-Network"] = "true"
        return Response(status_code=204, headers=headers)

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if message["type"] == "http.response.start":
            origin = request_headers.get("origin")
            if origin is not None and not self.is_allowed_origin(origin):
                # Starlette would still add the expose headers here
                message.setdefault("headers", [])
                MutableHeaders(scope=message).add_vary_header("Origin")
                await send(message)
                return
        await super().send(message, send, request_headers)
