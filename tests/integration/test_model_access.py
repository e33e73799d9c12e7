"""Which models a principal may use: an API key's model list and a JWT's `models` claim, on a
server of several models (403 naming the model; /v1/models lists only the allowed ones), and
a keys.db from before per-key models opened as it is."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import jwt

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.engines.pool import ModelSpec, Pool
from llmhost.security.auth import KeyStore
from tests.conftest import open_settings

SECRET = "s" * 40


def pool() -> Pool:
    return Pool(
        [
            ModelSpec(id=name, build=lambda name=name: FakeEngine(model_id=name))
            for name in ("chat-a", "chat-b", "chat-c")
        ]
    )


async def run(settings: Settings, calls):
    app = create_app(pool(), settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await calls(c, app)


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_key_limited_to_some_models(tmp_path):
    s = Settings(home=tmp_path, rate_limit_rps=0)
    keys = KeyStore(s.keys_db)
    limited, info = keys.create("dev", models=["chat-b", "chat-a", "chat-b"])
    everything, _ = keys.create("ops")
    keys.close()
    assert info.models == ("chat-b", "chat-a")

    async def calls(c, app):
        h = {"Authorization": f"Bearer {limited}"}
        ok = await c.post("/v1/chat/completions", json=chat("chat-a"), headers=h)
        refused = await c.post("/v1/chat/completions", json=chat("chat-c"), headers=h)
        listed = await c.get("/v1/models", headers=h)
        one = await c.get("/v1/models/chat-c", headers=h)
        full = await c.get("/v1/models", headers={"Authorization": f"Bearer {everything}"})
        return ok, refused, listed, one, full, app.state.pool.status()

    ok, refused, listed, one, full, status = await run(s, calls)
    assert ok.status_code == 200
    assert refused.status_code == 403
    assert "'chat-c'" in refused.json()["error"]["message"]
    assert "chat-b, chat-a" in refused.json()["error"]["message"]
    assert [m["id"] for m in listed.json()["data"]] == ["chat-a", "chat-b"]
    assert one.status_code == 404
    assert [m["id"] for m in full.json()["data"]] == ["chat-a", "chat-b", "chat-c"]
    assert status[2]["state"] == "unloaded"  # a refused request loads nothing


async def test_a_jwt_models_claim(tmp_path):
    s = Settings(
        home=tmp_path, jwt_secret=SECRET, jwt_audience="llmhost", rate_limit_rps=0, audit=False
    )
    now = int(time.time())
    base = {"sub": "alice", "exp": now + 600, "aud": "llmhost"}

    def token(**claims) -> dict:
        return {"Authorization": "Bearer " + jwt.encode(base | claims, SECRET, "HS256")}

    async def calls(c, _):
        return (
            await c.post("/v1/chat/completions", json=chat("chat-c"), headers=token()),
            await c.post(
                "/v1/chat/completions", json=chat("chat-c"), headers=token(models=["chat-a"])
            ),
            await c.post(
                "/v1/chat/completions", json=chat("chat-a"), headers=token(models=["chat-a"])
            ),
            await c.post(
                "/v1/chat/completions", json=chat("chat-a"), headers=token(models="chat-a")
            ),
        )

    free, refused, allowed, malformed = await run(s, calls)
    assert free.status_code == 200 and refused.status_code == 403 and allowed.status_code == 200
    assert malformed.status_code == 401 and "models claim" in malformed.json()["error"]["message"]


def test_a_keys_db_from_before_per_key_models(tmp_path):
    db = sqlite3.connect(tmp_path / "keys.db")
    db.execute(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, "
        "user_id TEXT NOT NULL, role TEXT NOT NULL, created REAL NOT NULL, expires REAL, "
        "revoked REAL, rpm INTEGER, tpm INTEGER)"
    )
    db.execute(
        "INSERT INTO api_keys VALUES ('abc', ?, 'old', 'user', 1.0, NULL, NULL, 5, NULL)",
        ("0" * 64,),
    )
    db.commit()
    db.close()
    keys = KeyStore(tmp_path / "keys.db")
    (old,) = keys.list()
    assert old.user_id == "old" and old.rpm == 5 and old.models is None
    keys.create("new", models=["m"])
    assert [k.models for k in keys.list()] == [None, ("m",)]
    keys.close()


async def test_a_models_own_requests_per_minute(tmp_path):
    pool = Pool(
        [
            ModelSpec(id="small", build=lambda: FakeEngine(model_id="small"), rpm=2),
            ModelSpec(id="big", build=lambda: FakeEngine(model_id="big")),
        ]
    )
    app = create_app(pool, open_settings())  # auth and limits off: the model's own applies
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            codes = [
                (await c.post("/v1/chat/completions", json=chat("small"))).status_code
                for _ in range(3)
            ]
            refused = await c.post("/v1/chat/completions", json=chat("small"))
            other = await c.post("/v1/chat/completions", json=chat("big"))
    assert codes == [200, 200, 429]
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "small: 2 requests/min" in refused.json()["error"]["message"]
    assert other.status_code == 200  # other models are not held to it
    metrics = app.state.metrics.render().decode()
    assert 'llmhost_rate_limit_rejections_total{limit="model"} 2.0' in metrics
