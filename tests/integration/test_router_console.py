"""The router's console (the fleet page), through httpx against the router app: off without
an admin token, login with the token only (a wrong one refused, then limited), hardened
cookies and security headers, the upstreams shown without credentials and with markup as
text, weights set from the page (CSRF checked, bad values refused with a message), the
session cookie no credential on the router's API, and the fleet's charts sampled from the
router's own counters."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from llmhost.api.console.app import CSP
from llmhost.api.console.fleet import FleetSampler, models_of
from llmhost.api.console.sessions import SESSION_COOKIE
from llmhost.api.router import Pool, create_router_app, parse_upstream

TOKEN = "router-console-token"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
SECRET_URL = "http://alice:s3cret-pass@127.0.0.1:9/v1base?api_key=sk-live-123"
EVIL = "<script>alert(1)</script>"


@asynccontextmanager
async def fleet(token: str | None = TOKEN, **kw) -> AsyncIterator[tuple[httpx.AsyncClient, Pool]]:
    pool = Pool(
        [parse_upstream(f"blue={SECRET_URL}", 0), parse_upstream("green=http://127.0.0.1:9", 1)],
        check_every=3600,
    )
    app = create_router_app(pool, admin_token=token, **kw)
    async with app.router.lifespan_context(app):  # its first health checks fail: port 9
        pool.upstreams[0].models = frozenset({"llama-3-8b", EVIL})
        pool.upstreams[1].models = frozenset({"llama-3-8b"})
        pool.upstreams[1].healthy = True
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, pool


async def login(client: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await client.get("/console/login")
    assert page.status_code == 200, page.text
    form = CSRF.search(page.text).group(1)
    return await client.post("/console/login", data={"csrf": form, "key": token})


async def csrf(client: httpx.AsyncClient) -> str:
    page = await client.get("/console")
    assert page.status_code == 200, page.text
    return CSRF.search(page.text).group(1)


async def test_console_is_off_without_an_admin_token():
    async with fleet(token=None) as (c, _pool):
        for path in ("/console", "/console/login"):
            r = await c.get(path)
            assert r.status_code == 404 and "--admin-token-file" in r.text
            assert r.headers["content-security-policy"] == CSP
        r = await c.post("/console/login", data={"csrf": "x", "key": "anything"})
        assert r.status_code == 404


async def test_no_console_leaves_the_path_to_the_upstreams():
    async with fleet(console=False) as (c, _pool):
        r = await c.get("/console")  # proxied: no upstream answers on port 9
        assert r.status_code == 503 and "content-security-policy" not in r.headers


async def test_login_with_the_token_gives_a_hardened_session():
    async with fleet() as (c, _pool):
        r = await c.get("/console")
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        r = await login(c, TOKEN)
        assert r.status_code == 303 and r.headers["location"] == "/console"
        cookie = next(h for h in r.headers.get_list("set-cookie") if SESSION_COOKIE in h)
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/console" in low
        page = await c.get("/console")
        assert page.status_code == 200 and "router-admin" in page.text
        for name, value in [
            ("content-security-policy", CSP),
            ("x-frame-options", "DENY"),
            ("cache-control", "no-store"),
        ]:
            assert page.headers[name] == value


async def test_secure_cookie_when_asked():
    async with fleet(secure_cookies=True) as (c, _pool):
        r = await login(c, TOKEN)
        cookie = next(h for h in r.headers.get_list("set-cookie") if SESSION_COOKIE in h)
        assert "secure" in cookie.lower()


async def test_wrong_tokens_are_refused_then_limited():
    async with fleet() as (c, _pool):
        r = await login(c, "not-the-token")
        assert r.status_code == 401 and "not the router" in r.text
        assert SESSION_COOKIE + "=" not in r.headers.get("set-cookie", "")
        for _ in range(9):
            assert (await login(c, "x" * 5000)).status_code == 401  # long input too
        r = await login(c, TOKEN)  # the 11th try within the minute, even the right token
        assert r.status_code == 429 and "wait a minute" in r.text
        page = await c.get("/console/login")
        r = await c.post("/console/login", data={"key": TOKEN})  # no form token
        assert r.status_code == 403 and page.status_code == 200


async def test_fleet_page_shows_upstreams_without_credentials_and_markup_as_text():
    async with fleet() as (c, _pool):
        await login(c, TOKEN)
        page = (await c.get("/console")).text
        assert "s3cret" not in page and "sk-live-123" not in page and "alice" not in page
        assert 'href="http://127.0.0.1:9/v1base/console"' in page
        assert 'href="http://127.0.0.1:9/console"' in page
        assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert re.search(r"llama-3-8b</td><td>blue, green</td><td>1 of 2", page)
        assert page.count("<figure") == 4 and "<script src=" in page


async def test_weights_from_the_page():
    async with fleet() as (c, pool):
        await login(c, TOKEN)
        token = await csrf(c)
        r = await c.post("/console/upstreams/green/weight", data={"csrf": token, "weight": "0"})
        assert r.status_code == 303
        assert pool.get("green").weight == 0.0
        assert "green now takes weight 0" in (await c.get("/console")).text
        for bad, said in [
            ("-1", "0..1000"),
            ("1e9", "0..1000"),
            ("abc", "a number"),
            ("nan", "0..1000"),
            ("", "a number"),
        ]:
            r = await c.post("/console/upstreams/blue/weight", data={"csrf": token, "weight": bad})
            assert r.status_code == 303, bad
            assert said in (await c.get("/console")).text, bad
            assert pool.get("blue").weight == 1.0
        r = await c.post("/console/upstreams/nope/weight", data={"csrf": token, "weight": "1"})
        assert r.status_code == 303 and "no upstream named" in (await c.get("/console")).text
        r = await c.post("/console/upstreams/blue/weight", data={"weight": "5"})
        assert r.status_code == 403 and pool.get("blue").weight == 1.0
        r = await c.post("/console/upstreams/blue/weight", data={"csrf": "x" * 43, "weight": "5"})
        assert r.status_code == 403 and pool.get("blue").weight == 1.0


async def test_session_is_no_credential_on_the_routers_api_and_logout_ends_it():
    async with fleet() as (c, _pool):
        await login(c, TOKEN)
        sid = c.cookies.get(SESSION_COOKIE)
        r = await c.get("/router/status", headers={"cookie": f"{SESSION_COOKIE}={sid}"})
        assert r.status_code == 401
        r = await c.put(
            "/router/weights",
            json={"blue": 0},
            headers={"cookie": f"{SESSION_COOKIE}={sid}"},
        )
        assert r.status_code == 401
        token = await csrf(c)
        r = await c.post("/console/logout", data={"csrf": token})
        assert r.status_code == 303
        c.cookies.set(SESSION_COOKIE, sid, domain="t.local", path="/console")
        assert (await c.get("/console")).status_code == 303
        assert (await c.get("/console/live")).status_code == 401


async def test_live_part_needs_a_session_and_carries_the_table():
    async with fleet() as (c, _pool):
        assert (await c.get("/console/live")).status_code == 401
        await login(c, TOKEN)
        r = await c.get("/console/live")
        assert r.status_code == 200 and 'data-upstream="green"' in r.text
        assert "<html" not in r.text


def test_sampler_rates_from_the_routers_counters():
    pool = Pool([parse_upstream("a=http://127.0.0.1:9", 0)], check_every=3600)
    now = [100.0]
    s = FleetSampler(pool, every=5, clock=lambda: now[0])
    s.tick()
    u = pool.upstreams[0]
    for ok, seconds in [(True, 0.1), (True, 0.3), (False, 0.2), (True, 0.2)]:
        u.record(ok, seconds)
    u.outstanding = 3
    now[0] += 2.0
    s.tick()
    (sample,) = s.samples
    assert sample.requests_per_s == pytest.approx(2.0)
    assert sample.latency_ms == pytest.approx(200.0)
    assert sample.errors_per_s == pytest.approx(0.5)
    assert sample.in_flight == 3.0
    now[0] += 5.0
    s.tick()
    assert s.samples[-1].latency_ms is None and s.samples[-1].requests_per_s == 0.0
    charts = {c.key: c for c in s.charts()}
    assert charts["requests"].peak == "2.00" and charts["latency"].latest == "200"


def test_models_of_counts_upstreams_taking_traffic():
    pool = Pool([parse_upstream(f"u{i}=http://127.0.0.1:9", i) for i in range(3)], check_every=3600)
    for u, healthy, weight in zip(pool.upstreams, [True, True, False], [1, 0, 1], strict=True):
        u.models, u.healthy, u.weight = frozenset({"m"}), healthy, weight
    assert models_of(pool.upstreams) == [{"id": "m", "upstreams": ["u0", "u1", "u2"], "live": 1}]


async def test_router_sessions_page_and_its_own_links():
    async with fleet() as (c, _pool):
        await login(c, TOKEN)
        page = await c.get("/console/sessions")
        assert page.status_code == 200 and 'data-user="router-admin"' in page.text
        nav = page.text[page.text.index("<nav>") : page.text.index("</nav>")]
        assert '"/console"' in nav and '"/console/sessions"' in nav
        assert "/console/keys" not in nav and "/console/usage" not in nav
        assert (await c.get("/console/keys")).status_code != 200  # no such page on a router


async def test_router_cli_public_url_makes_the_cookies_secure(monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from llmhost.cli.main import app as cli

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    monkeypatch.setenv("LLMHOST_ROUTER_TOKEN", TOKEN)
    args = ["router", "-u", "http://127.0.0.1:9", "--check-every", "3600"]
    done = CliRunner().invoke(cli, [*args, "--public-url", "https://llm.example.com"])
    assert done.exit_code == 0, done.output
    for wrong in ("llm.example.com", "https://", "https://h/llm", "https://u:p@h"):
        bad = CliRunner().invoke(cli, [*args, "--public-url", wrong])
        assert bad.exit_code != 0 and "--public-url is" in str(bad.exception), (wrong, bad)
    assert len(served) == 1
    (app,) = served
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await login(c, TOKEN)
    cookie = next(h for h in r.headers.get_list("set-cookie") if SESSION_COOKIE in h)
    assert "secure" in cookie.lower()
