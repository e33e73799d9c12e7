"""The router's console: the fleet behind `llmhost router` on one page, for whoever logs in
with the router's admin token. Every upstream with its health, traffic weight, requests in
flight, last minute's error ratio and p99, and the models it serves; a form per upstream to
change its weight (the blue-green shift, without curl); live charts of the fleet's requests,
latency, errors and requests in flight, sampled from the router's own counters; and a link to
each upstream's own console, where its keys, usage, audit log and playground are.

It shares the server console's sessions, CSRF tokens, templates, static files and security
headers; without an admin token configured it only says how to turn it on."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from llmhost.api.console.app import ConsoleBase, install_common, templates
from llmhost.api.console.charts import (
    HEIGHT,
    SAMPLE_EVERY_S,
    WIDTH,
    Chart,
    RateSampler,
    chart,
)
from llmhost.api.console.pages import (
    MAX_KEY_CHARS,
    checked_form,
    login_form_for,
    login_token_ok,
    read_form,
    render,
    see_other,
    session_of,
    start_session,
)
from llmhost.api.console.sessions import COOKIE_PATH, SESSION_COOKIE, Sessions
from llmhost.api.router import Pool, RouterApp, Upstream
from llmhost.errors import LlmhostError
from llmhost.security.auth import Principal

log = logging.getLogger("llmhost.console")
SESSION_S = 8 * 3600.0
LOGIN_FAILURES = RateLimitItemPerMinute(10)  # failed logins per client address
ROUTER_ADMIN = "router-admin"
FLEET_NAV = (("", "Fleet", "fleet"), ("/sessions", "Sessions", "sessions"))


@dataclass(frozen=True)
class FleetTotals:
    """The router's counters, summed over the upstreams, at one moment."""

    at: float
    requests: int
    errors: int
    seconds: float  # summed request durations, for the interval's mean
    in_flight: int


@dataclass(frozen=True)
class FleetSample:
    at: float
    requests_per_s: float
    latency_ms: float | None  # mean of the requests that ended in the interval
    errors_per_s: float
    in_flight: float


def read_fleet(pool: Pool, now: float) -> FleetTotals:
    ups = pool.upstreams
    return FleetTotals(
        now,
        sum(u.requests for u in ups),
        sum(u.errors for u in ups),
        sum(u.seconds for u in ups),
        sum(u.outstanding for u in ups),
    )


def fleet_rates(before: FleetTotals, after: FleetTotals) -> FleetSample:
    dt = max(after.at - before.at, 1e-6)
    done = after.requests - before.requests
    return FleetSample(
        at=after.at,
        requests_per_s=done / dt,
        latency_ms=(after.seconds - before.seconds) / done * 1000 if done > 0 else None,
        errors_per_s=(after.errors - before.errors) / dt,
        in_flight=float(after.in_flight),
    )


FLEET_SERIES: tuple[tuple[str, str, str, Callable[[FleetSample], float | None]], ...] = (
    ("requests", "Requests", "req/s", lambda s: s.requests_per_s),
    ("latency", "Mean latency (to the last byte)", "ms", lambda s: s.latency_ms),
    ("errors", "Errors (5xx, failed upstreams)", "err/s", lambda s: s.errors_per_s),
    ("in_flight", "In flight", "requests", lambda s: s.in_flight),
)


class FleetSampler(RateSampler[FleetTotals, FleetSample]):
    """The fleet's rates, sampled from `pool`'s counters."""

    def __init__(
        self,
        pool: Pool,
        every: float = SAMPLE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(lambda now: read_fleet(pool, now), fleet_rates, every, clock)
        self.pool = pool

    def charts(self) -> list[Chart]:
        data = list(self.samples)
        return [
            chart(k, title, unit, [get(s) for s in data]) for k, title, unit, get in FLEET_SERIES
        ]


@dataclass
class FleetConsole(ConsoleBase):
    """The router's console: its pages act on `router`'s pool of upstreams."""

    router: RouterApp
    sampler: FleetSampler
    failures: MovingWindowRateLimiter = field(
        default_factory=lambda: MovingWindowRateLimiter(MemoryStorage())
    )


def fleet_of(request: Request) -> FleetConsole:
    return cast(FleetConsole, request.app.state.console)


def models_of(upstreams: list[Upstream]) -> list[dict[str, Any]]:
    """Every model some upstream serves, with the upstreams serving it and how many of them
    are taking traffic (healthy, weight above 0)."""
    found: dict[str, list[Upstream]] = {}
    for u in upstreams:
        for m in u.models:
            found.setdefault(m, []).append(u)
    return [
        {
            "id": m,
            "upstreams": [u.name for u in ups],
            "live": sum(1 for u in ups if u.healthy and u.weight > 0),
        }
        for m, ups in sorted(found.items())
    ]


def console_url(u: Upstream) -> str:
    """The upstream's own console: its URL without credentials, query or fragment."""
    parts = urlsplit(u.shown)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + COOKIE_PATH, "", ""))


def fleet_context(request: Request) -> dict[str, Any]:
    fleet = fleet_of(request)
    ups = fleet.router.pool.upstreams
    return {
        "upstreams": [{**u.status(), "console": console_url(u)} for u in ups],
        "models": models_of(ups),
        "charts": fleet.sampler.charts(),
        "every": fleet.sampler.every,
        "width": WIDTH,
        "height": HEIGHT,
    }


def console_off(request: Request) -> Response:
    return render(
        request,
        "error.html",
        404,
        title="The router console is off",
        message="It needs the router's admin token: start the router with --admin-token-file "
        "(or LLMHOST_ROUTER_TOKEN) and log in with that token.",
        session=None,
    )


def token_of(request: Request) -> str | None:
    return fleet_of(request).router.admin_token


async def fleet_page(request: Request) -> Response:
    if token_of(request) is None:
        return console_off(request)
    session = session_of(request)
    flash, session.flash = session.flash, None
    return render(
        request, "fleet.html", session=session, page="fleet", flash=flash, **fleet_context(request)
    )


async def fleet_live(request: Request) -> Response:
    session = session_of(request)
    return render(request, "fleet_live.html", session=session, **fleet_context(request))


async def login_page(request: Request) -> Response:
    if token_of(request) is None:
        return console_off(request)
    if fleet_of(request).sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
        return see_other("")
    return login_form_for(request, None, 200, auth_on=True, key_label="Router admin token")


def _login_again(request: Request, error: str, status: int) -> Response:
    return login_form_for(request, error, status, auth_on=True, key_label="Router admin token")


async def login(request: Request) -> Response:
    token = token_of(request)
    if token is None:
        return console_off(request)
    form = await read_form(request)
    if not login_token_ok(request, form):
        return _login_again(request, "The login form expired: try again.", 403)
    fleet = fleet_of(request)
    client = (request.client.host if request.client else "?")[:64]
    if not await fleet.failures.test(LOGIN_FAILURES, client):
        return _login_again(
            request, "Too many failed logins from this address: wait a minute.", 429
        )
    given = form.get("key", "").strip()[: MAX_KEY_CHARS + 1]
    if not hmac.compare_digest(given.encode(), token.encode()):
        await fleet.failures.hit(LOGIN_FAILURES, client)
        log.warning("router console login failed from %s", client)
        return _login_again(request, "That is not the router's admin token.", 401)
    return start_session(
        request, Principal(ROUTER_ADMIN, "admin", via="router_token"), see_other("")
    )


async def set_weight(request: Request) -> Response:
    session = session_of(request)
    form = await checked_form(request, session)
    name = request.path_params["name"]
    pool = fleet_of(request).router.pool
    try:
        weight = float(form.get("weight", ""))
    except ValueError:
        session.flash = "A weight is a number from 0 to 1000."
        return see_other("")
    try:
        pool.set_weights({name: weight})
    except LlmhostError as exc:
        session.flash = exc.message
        return see_other("")
    session.flash = f"{name} now takes weight {weight:g}."
    log.info("router console: weight of %s set to %g", name[:64], weight)
    return see_other("")


def build_fleet_console(router: RouterApp, *, secure_cookies: bool = False) -> FastAPI:
    """The console app for `router` (its sampler runs while the router runs)."""
    console = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    fleet = FleetConsole(
        sessions=Sessions(SESSION_S),
        templates=templates(FLEET_NAV),
        secure_cookies=secure_cookies,
        router=router,
        sampler=FleetSampler(router.pool),
    )
    console.state.console = fleet
    router.background.append(fleet.sampler.run)
    root, get, post = COOKIE_PATH, ["GET"], ["POST"]
    console.add_api_route(root, fleet_page, methods=get, response_class=HTMLResponse)
    console.add_api_route(root + "/live", fleet_live, methods=get, response_class=HTMLResponse)
    console.add_api_route(root + "/login", login_page, methods=get, response_class=HTMLResponse)
    console.add_api_route(root + "/login", login, methods=post)
    console.add_api_route(root + "/upstreams/{name:path}/weight", set_weight, methods=post)
    install_common(console)
    return console
