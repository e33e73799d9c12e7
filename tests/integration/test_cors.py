"""CORS over httpx's ASGI transport with the scripted engine and authentication on: preflights
answered before auth, the allow and expose headers on refusals and streams, origins matched
exactly, by port wildcard or `*`, nothing at all by default, and bad entries refused at start."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from llmhost.api import create_app
from llmhost.api.cors import CorsMiddleware
from llmhost.audit.store import SqliteAuditStore
from llmhost.cli import serve as serve_cli
from llmhost.cli.main import app as cli_app
from llmhost.config import Settings, load_settings
from llmhost.engines.fake import FakeEngine
from llmhost.errors import ConfigError
from llmhost.security.auth import KeyStore

APP = "https://app.example.com"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def settings(tmp_path: Path, **over) -> Settings:
    return Settings(home=tmp_path, rate_limit_rps=0, **over)


def make_key(s: Settings) -> str:
    keys = KeyStore(s.keys_db)
    try:
        return keys.create("web")[0]
    finally:
        keys.close()


@contextlib.asynccontextmanager
async def running(s: Settings):
    app = create_app(FakeEngine(script=["Hello", " there"]), s)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, app


def preflight(c: httpx.AsyncClient, origin: str, method="POST", headers: str | None = None):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        h["Access-Control-Request-Headers"] = headers
    return c.options("/v1/chat/completions", headers=h)


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def records(tmp_path: Path) -> list:
    store = SqliteAuditStore(tmp_path / "audit.db")
    try:
        return store.search()
    finally:
        store.close()


def requests_counted(app, status: str) -> float:
    return sum(
        s.value
        for m in app.state.metrics.requests.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["status"] == status
    )


async def test_no_cors_headers_by_default(tmp_path):
    s = settings(tmp_path)
    assert s.cors_origins == []
    key = make_key(s)
    async with running(s) as (c, app):
        r = await preflight(c, APP, headers="authorization, content-type")
        assert not cors_headers(r)
        auth = {"Origin": APP, "Authorization": f"Bearer {key}"}
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 200 and not cors_headers(r)
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
        assert r.status_code == 401 and not cors_headers(r)
        # the preflight is refused, but is neither a generation request nor a counted 4xx
        assert requests_counted(app, "401") == 1
        # a plain OPTIONS is an API request like any other: counted and audited alike
        r = await c.options("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 405 and requests_counted(app, "405") == 1
    assert sorted(rec.status for rec in records(tmp_path)) == [200, 401, 405]


async def test_preflight_is_answered_before_auth(tmp_path):
    s = settings(tmp_path, cors_origins=[APP])
    asked = (
        "authorization, content-type, x-request-id, x-stainless-os, x-stainless-lang, "
        "x-stainless-package-version, x-stainless-retry-count, openai-organization, "
        "openai-project"
    )
    async with running(s) as (c, app):
        r = await preflight(c, APP, headers=asked)
        assert r.status_code == 204, r.text
        assert r.headers["access-control-allow-origin"] == APP
        assert "Origin" in r.headers["vary"]
        assert set(r.headers["access-control-allow-methods"].split(", ")) == {
            "GET",
            "POST",
            "OPTIONS",
            "DELETE",
        }
        allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
        assert allowed == {h.strip() for h in asked.split(",")}
        assert r.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in r.headers
        # a preflight that names no headers gets the list
        r = await preflight(c, APP, method="GET")
        assert r.status_code == 204
        listed = r.headers["access-control-allow-headers"].lower()
        for h in ("authorization", "content-type", "x-request-id", "openai-project"):
            assert h in listed
        # a later SDK's x-stainless-* header passes too
        r = await preflight(c, APP, headers="x-stainless-something-new")
        assert r.status_code == 204
        # preflights reached neither auth, metrics nor the audit log
        assert requests_counted(app, "204") == 0
        failures = app.state.metrics.auth_failures.collect()[0].samples[0].value
        assert failures == 0
    assert records(tmp_path) == []


@pytest.mark.parametrize(
    "origin, method, headers",
    [
        ("https://evil.example.com", "POST", "authorization"),
        ("https://app.example.com.evil.com", "POST", None),
        ("http://app.example.com", "POST", None),  # another scheme is another origin
        ("null", "POST", None),
        (APP, "PUT", None),
        (APP, "POST", "authorization, x-custom"),
    ],
)
async def test_refused_preflight_grants_nothing(tmp_path, origin, method, headers):
    async with running(settings(tmp_path, cors_origins=[APP])) as (c, _):
        r = await preflight(c, origin, method=method, headers=headers)
        assert r.status_code == 400 and r.text.startswith("Disallowed CORS")
        assert not cors_headers(r)
        assert "Origin" in r.headers["vary"]


async def test_headers_on_refusals_and_on_a_stream(tmp_path):
    s = settings(tmp_path, cors_origins=[APP], rate_limit_rpm=2, max_request_bytes=4096)
    key = make_key(s)
    web = {"Origin": APP}
    async with running(s) as (c, _):
        r = await c.post("/v1/chat/completions", json=CHAT, headers=web)
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == APP
        exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {
            "x-request-id",
            "retry-after",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        } <= exposed
        auth = {**web, "Authorization": f"Bearer {key}"}
        async with c.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["access-control-allow-origin"] == APP
            assert "x-request-id" in r.headers and "x-ratelimit-limit" in r.headers
            body = "".join([chunk async for chunk in r.aiter_text()])
        assert "Hello" in body and body.rstrip().endswith("data: [DONE]")
        r = await c.post("/v1/chat/completions", content=b"x" * 5000, headers=auth)
        assert r.status_code == 413 and r.headers["access-control-allow-origin"] == APP
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth)
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 429, r.text
        assert r.headers["access-control-allow-origin"] == APP and "retry-after" in r.headers
        # another origin's page cannot read the answer: no ACAO, no expose list
        r = await c.get("/v1/models", headers={"Origin": "https://evil.example.com"})
        assert r.status_code == 401 and not cors_headers(r)
        assert "Origin" in r.headers["vary"]


async def test_port_wildcard(tmp_path):
    s = settings(tmp_path, cors_origins=["http://localhost:*", "http://127.0.0.1:*"])
    async with running(s) as (c, _):
        for origin in ("http://localhost:5173", "http://localhost", "http://127.0.0.1:8000"):
            r = await preflight(c, origin, headers="authorization")
            assert r.status_code == 204, origin
            assert r.headers["access-control-allow-origin"] == origin
        for origin in (
            "https://localhost:5173",
            "http://localhost.evil.com:5173",
            "http://evil.com:5173",
            "http://127.0.0.2:8000",
            "http://localhost:5173/",
            "http://localhost:99999",
        ):
            r = await preflight(c, origin)
            assert r.status_code == 400 and not cors_headers(r), origin


async def test_any_origin(tmp_path):
    async with running(settings(tmp_path, cors_origins=["*"])) as (c, _):
        r = await preflight(c, "https://anywhere.example", headers="authorization, content-type")
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers
        r = await c.get("/v1/models", headers={"Origin": "https://anywhere.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
        # a public page reaching a private address: only for origins named one by one
        private = {"Access-Control-Request-Private-Network": "true"}
        r = await c.options(
            "/v1/models",
            headers={"Origin": APP, "Access-Control-Request-Method": "GET", **private},
        )
        assert r.status_code == 400 and not cors_headers(r)
    async with running(settings(tmp_path, cors_origins=[APP])) as (c, _):
        r = await c.options(
            "/v1/models",
            headers={"Origin": APP, "Access-Control-Request-Method": "GET", **private},
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-private-network"] == "true"


@pytest.mark.parametrize(
    "entry",
    [
        "https://app.example.com/",
        "https://app.example.com/chat",
        "app.example.com",
        "null",
        "https://*.example.com",
        "http://localhost:x",
        "http://localhost:0",
        "https://user@app.example.com",
    ],
)
def test_bad_entry_is_a_config_error_naming_it(entry):
    with pytest.raises(ConfigError) as exc:
        load_settings(cors_origins=["https://ok.example.com", entry])
    assert "cors_origins" in exc.value.message and repr(entry) in exc.value.message
    assert "scheme://host[:port]" in exc.value.message
    with pytest.raises(ConfigError, match="cors_origins"):
        CorsMiddleware(lambda *a: None, origins=[entry])


def test_entries_are_normalized():
    s = load_settings(cors_origins=["HTTPS://App.Example.com:443, http://localhost:*", APP])
    assert s.cors_origins == [APP, "http://localhost:*"]


@pytest.fixture
def served(monkeypatch, tmp_path):
    """`llmhost serve` up to the point it would start the server: the settings it would use."""
    got: list[Settings] = []
    model = tmp_path / "demo.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(serve_cli, "serve_settings", lambda s, _engine, _announce: got.append(s))
    monkeypatch.setattr("llmhost.store.demo.ensure_demo_model", lambda _dir: model)
    monkeypatch.setattr(serve_cli, "_check_model_files", lambda _s: None)

    def run(*args: str) -> Settings:
        r = CliRunner().invoke(cli_app, ["serve", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return got.pop()

    return run


def test_serve_flag_and_demo_default(served, monkeypatch):
    assert served("--demo").cors_origins == ["http://localhost:*", "http://127.0.0.1:*"]
    s = served(
        "--engine",
        "fake",
        "--cors-origins",
        APP,
        "--cors-origins",
        "http://localhost:3000,http://localhost:3001",
    )
    assert s.cors_origins == [APP, "http://localhost:3000", "http://localhost:3001"]
    assert served("--engine", "fake").cors_origins == []
    assert served("--demo", "--cors-origins", APP).cors_origins == [APP]
    # set by the user, even to nothing, it wins over the demo default
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", "")
    assert served("--demo").cors_origins == []
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", "http://127.0.0.1:8000")
    assert served("--demo").cors_origins == ["http://127.0.0.1:8000"]
