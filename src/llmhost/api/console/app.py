"""The console as an ASGI app of its own beside the API: `ConsoleMiddleware` hands it every
/console request before the API's middlewares (Bearer authentication, audit, metrics) see
it, so the console's session cookie never reaches the API, and every console response gets
the security headers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost.api.console.charts import Sampler
from llmhost.api.console.pages import (
    NeedLogin,
    Refused,
    install_pages,
    logout,
    need_login,
    refused,
)
from llmhost.api.console.sessions import COOKIE_PATH, Sessions
from llmhost.api.console.sessions_page import install_sessions
from llmhost.api.console.sso import Oidc
from llmhost.api.security import BodyLimitMiddleware
from llmhost.audit.records import ChainReport
from llmhost.security.auth import Principal

HERE = Path(__file__).parent
STATIC_PATH = COOKIE_PATH + "/static"
MAX_FORM_BYTES = 1024 * 1024  # the playground's conversation is the largest body

# No inline script or style anywhere: the pages load /console/static only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


@dataclass
class VerifyState:
    """The audit chain's last check, run on demand in a thread, one at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    report: ChainReport | None = None
    at: float | None = None  # Unix time the last check ended


@dataclass
class ConsoleBase:
    """What every console's pages share (a server's, or a router's for its fleet): sessions,
    templates and whether cookies are Secure."""

    sessions: Sessions
    templates: Environment
    secure_cookies: bool

    def still_valid(self, principal: Principal) -> bool:
        """Whether a session's principal may still act (checked on every console request)."""
        return True


@dataclass
class Console(ConsoleBase):
    """A server's console: the API app its pages act on, and its charts."""

    api: FastAPI
    sampler: Sampler | None  # None: metrics are off

    def still_valid(self, principal: Principal) -> bool:
        """A session made with an API key ends when the key is revoked or expires (from the
        console, the admin API or `llmhost keys revoke` in another process alike)."""
        authenticator = self.api.state.authenticator
        if principal.via != "api_key" or principal.key_id is None or authenticator is None:
            return True
        return authenticator.keys is None or bool(authenticator.keys.is_active(principal.key_id))

    verify: VerifyState = field(default_factory=VerifyState)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # loads started from a page
    oidc: Oidc | None = None  # single sign-on, when configured
    public_url: str | None = None  # scheme://host[:port] browsers use, behind a TLS proxy


def utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t is not None else "-"


SERVER_NAV = (
    ("", "Overview", "overview"),
    ("/usage", "Usage", "usage"),
    ("/keys", "Keys", "keys"),
    ("/audit", "Audit", "audit"),
    ("/playground", "Playground", "playground"),
    ("/sessions", "Sessions", "sessions"),
)


def templates(nav: tuple[tuple[str, str, str], ...] = SERVER_NAV) -> Environment:
    """The pages' templates, every value escaped (a model id or an audited prompt holding
    markup is shown as text); `nav`: the pages the bar links to (path, label, page name)."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = utc
    env.globals["nav"] = nav
    return env


def pool_load(pool: Any) -> float:
    """Requests every model holds now: decoding, queued in its engine, or waiting for it to
    load."""
    return float(sum(m["in_flight"] + m["waiting"] for m in pool.status()))


def build_console(api: FastAPI) -> FastAPI:
    """The console app for `api` (an app `create_app` made, its state filled in)."""
    state = api.state
    settings = state.settings
    console = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    console.state.console = Console(
        api=api,
        sessions=Sessions(settings.console_session_lifetime),
        sampler=Sampler(state.metrics, load=lambda: pool_load(state.pool))
        if state.metrics is not None
        else None,
        templates=templates(),
        secure_cookies=settings.ssl_certfile is not None
        or (settings.console_public_url or "").startswith("https://"),
        public_url=settings.console_public_url,
        oidc=Oidc(settings) if settings.oidc_issuer is not None else None,
    )
    install_pages(console)
    install_common(console)
    return console


def install_common(console: FastAPI) -> None:
    """What every console has, a server's or a router's: logout, the sessions page, the
    static files, and the pages for a missing session and a refused request."""
    console.add_api_route(COOKIE_PATH + "/logout", logout, methods=["POST"])
    install_sessions(console)
    console.mount(STATIC_PATH, StaticFiles(directory=HERE / "static"), name="static")
    console.add_exception_handler(NeedLogin, need_login)
    console.add_exception_handler(Refused, refused)


def is_console_path(path: str) -> bool:
    return path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/")


class ConsoleMiddleware:
    """Sends /console requests to the console app (bodies bounded, security headers on every
    response) and everything else on to the API."""

    def __init__(self, app: ASGIApp, console: FastAPI):
        self.app = app
        self.console = BodyLimitMiddleware(console, max_bytes=MAX_FORM_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {name for name, _ in SECURITY_HEADERS}
                ]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.console(scope, receive, send_with_headers)
