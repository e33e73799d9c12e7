"""The admin key endpoints through the app: create, list (never a secret), revoke and rotate
with a grace, each secret sent on a real request, the grace ending on the store's clock;
a non-admin key gets 403, unknown ids 404, and key changes land in the audit log."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def served(tmp_path):
    """An app on a keys.db with one admin and one user key, its key store on a test clock."""
    settings = Settings(home=tmp_path, rate_limit_rps=0)
    clock = Clock()
    keys = KeyStore(settings.keys_db, clock=clock)
    admin, _ = keys.create("root", "admin")
    user, _ = keys.create("joe")
    app = create_app(FakeEngine(), settings)
    app.state.authenticator.keys.close()
    app.state.authenticator.keys = keys  # the same keys.db, read on the test's clock
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, clock, bearer(admin), bearer(user)


async def complete(c: httpx.AsyncClient, key: str) -> int:
    r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=bearer(key))
    return r.status_code


async def test_rotate_through_the_api_with_a_grace(served):
    c, clock, admin, _ = served
    r = await c.post("/v1/admin/keys", json={"user": "ann", "rpm": 50}, headers=admin)
    assert r.status_code == 200, r.text
    made = r.json()
    first, kid = made["key"], made["key_id"]
    assert made["user_id"] == "ann" and made["rpm"] == 50 and made["state"] == "active"
    assert await complete(c, first) == 200

    r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": "24h"}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    second = body["key"]
    assert second != first and body["key_id"] == kid and body["rpm"] == 50
    assert body["old_secret_until"] == clock.now + 24 * HOUR and body["cut_short"] is False
    assert await complete(c, first) == 200
    assert await complete(c, second) == 200

    listed = (await c.get("/v1/admin/keys", headers=admin)).json()["data"]
    ann = next(k for k in listed if k["key_id"] == kid)
    assert ann["old_secret_until"] == body["old_secret_until"] and "key" not in ann
    text = (await c.get("/v1/admin/keys", headers=admin)).text
    for secret in (first, second):
        assert secret.rsplit("_", 1)[1] not in text
    assert "sha256" not in text

    clock.now += 24 * HOUR
    r = await c.post("/v1/completions", json={"prompt": "hi"}, headers=bearer(first))
    assert r.status_code == 401 and "grace period is over" in r.json()["error"]["message"]
    assert await complete(c, second) == 200

    r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": 600}, headers=admin)
    third = r.json()["key"]
    r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": "0"}, headers=admin)
    assert r.json()["cut_short"] is True and r.json()["old_secret_until"] is None
    fourth = r.json()["key"]
    assert [await complete(c, k) for k in (second, third, fourth)] == [401, 401, 200]


async def test_revoke_during_a_grace_through_the_api(served):
    c, _, admin, _ = served
    made = (await c.post("/v1/admin/keys", json={"user": "ann"}, headers=admin)).json()
    kid = made["key_id"]
    r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": "1h"}, headers=admin)
    new = r.json()["key"]
    r = await c.post(f"/v1/admin/keys/{kid}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert [await complete(c, k) for k in (made["key"], new)] == [401, 401]
    r = await c.post(f"/v1/admin/keys/{kid}/revoke", headers=admin)
    assert r.status_code == 409 and "already revoked" in r.json()["error"]["message"]
    r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": "1h"}, headers=admin)
    assert r.status_code == 409 and "revoked" in r.json()["error"]["message"]


async def test_the_key_endpoints_are_for_admins_only(served):
    c, _, admin, user = served
    kid = (await c.get("/v1/admin/keys", headers=admin)).json()["data"][1]["key_id"]
    calls = [
        ("GET", "/v1/admin/keys", None),
        ("POST", "/v1/admin/keys", {"user": "eve", "role": "admin"}),
        ("POST", f"/v1/admin/keys/{kid}/rotate", {"grace": "1h"}),
        ("POST", f"/v1/admin/keys/{kid}/revoke", None),
    ]
    for method, url, body in calls:
        r = await c.request(method, url, json=body, headers=user)
        assert r.status_code == 403, (url, r.text)
        assert r.json()["error"]["type"] == "permission_error"
        assert (await c.request(method, url, json=body)).status_code == 401
    users = [k["user_id"] for k in (await c.get("/v1/admin/keys", headers=admin)).json()["data"]]
    assert users == ["root", "joe"]  # nothing was made, and joe's key was neither
    assert await complete(c, user["Authorization"].split()[1]) == 200  # rotated nor revoked


async def test_bad_input_and_unknown_ids(served):
    c, _, admin, _ = served
    for url in ("/v1/admin/keys/feedface0000/rotate", "/v1/admin/keys/nope/revoke"):
        r = await c.post(url, json={"grace": "1h"} if "rotate" in url else None, headers=admin)
        assert r.status_code == 404, r.text
    kid = (await c.get("/v1/admin/keys", headers=admin)).json()["data"][1]["key_id"]
    for grace in ("forever", -1, "31d", True, "9" * 40, None):
        r = await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": grace}, headers=admin)
        assert r.status_code == 400 and "grace" in r.text, (grace, r.text)
    for body in (
        {"user": "a b"},  # the store's own check: printable, no spaces
        {"user": "x" * 129},
        {"user": "x", "role": "root"},
        {"user": "x", "models": []},
        {"user": "x", "models": ["m" * 257]},
        {"user": "x", "rpm": 0},
        {"user": "x", "expires": "soon"},
        {"user": "x", "secret": "mine"},
    ):
        r = await c.post("/v1/admin/keys", json=body, headers=admin)
        assert r.status_code == 400, (body, r.text)
    assert len((await c.get("/v1/admin/keys", headers=admin)).json()["data"]) == 2


async def test_key_changes_are_in_the_audit_log(served):
    c, _, admin, _ = served
    kid = (await c.post("/v1/admin/keys", json={"user": "ann"}, headers=admin)).json()["key_id"]
    await c.post(f"/v1/admin/keys/{kid}/rotate", json={"grace": "1h"}, headers=admin)
    await c.post(f"/v1/admin/keys/{kid}/revoke", headers=admin)
    want = [
        ("root", "/v1/admin/keys", 200),
        ("root", f"/v1/admin/keys/{kid}/rotate", 200),
        ("root", f"/v1/admin/keys/{kid}/revoke", 200),
    ]
    for _ in range(100):  # the writer is asynchronous
        r = await c.get("/v1/admin/audit?user=root", headers=admin)
        found = sorted((x["user_id"], x["route"], x["status"]) for x in r.json()["data"])
        if len(found) >= 3:
            break
        await asyncio.sleep(0.02)
    assert found == sorted(want)


async def test_a_method_the_keys_path_lacks_gets_405_naming_both_it_has(served):
    c, _, admin, _ = served
    for method in ("DELETE", "PUT", "OPTIONS"):
        r = await c.request(method, "/v1/admin/keys", headers=admin)
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST", method
    r = await c.get("/v1/admin/keys/abc/rotate", headers=admin)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
