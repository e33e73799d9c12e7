"""The console's edge, through httpx against the app (fake engines, real key store and audit
log on disk): login with admin, user and wrong keys, hardened cookies, the CSP and frame
headers, CSRF refusals, expired, tampered and ended sessions, the session cookie refused on
/v1, model ids and audited prompts holding markup shown as text, load/unload, the audit
page and its chain check, and the playground's stream made for the logged-in admin."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from llmhost.api import create_app
from llmhost.api.console.app import CSP
from llmhost.api.console.sessions import SESSION_COOKIE
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.engines.pool import ModelSpec, Pool
from llmhost.security.auth import KeyStore

EVIL = "<script>alert(1)</script>"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def make_pool() -> Pool:
    return Pool(
        [
            ModelSpec(id="fake-model", build=lambda: FakeEngine(model_id="fake-model")),
            ModelSpec(id=EVIL, build=lambda: FakeEngine(model_id=EVIL)),
        ]
    )


class Console:
    """An app with keys for an admin and a user, and a client for it."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, admin: str, user: str):
        self.app, self.client, self.admin, self.user = app, client, admin, user

    async def login(self, key: str) -> httpx.Response:
        page = await self.client.get("/console/login")
        token = CSRF.search(page.text).group(1)
        return await self.client.post("/console/login", data={"csrf": token, "key": key})

    def use_session(self, sid: str) -> None:
        """The client's only session cookie is now `sid`."""
        self.client.cookies.clear()
        self.client.cookies.set(SESSION_COOKIE, sid, domain="t.local", path="/console")

    async def csrf(self, path: str = "/console") -> str:
        page = await self.client.get(path)
        assert page.status_code == 200, page.text
        return CSRF.search(page.text).group(1)


@asynccontextmanager
async def console_app(tmp_path, **settings) -> AsyncIterator[Console]:
    s = Settings(home=tmp_path, rate_limit_rps=0, **settings)
    keys = KeyStore(s.keys_db)
    admin, _ = keys.create("root", "admin")
    user, _ = keys.create("bob", "user")
    keys.close()
    app = create_app(make_pool(), s)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        await app.state.pool.load("fake-model")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield Console(app, client, admin, user)


@pytest.fixture
async def con(tmp_path) -> AsyncIterator[Console]:
    async with console_app(tmp_path) as c:
        yield c


async def test_admin_logs_in_with_a_hardened_cookie(con):
    r = await con.login(con.admin)
    assert r.status_code == 303 and r.headers["location"] == "/console"
    cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert "secure" not in flags  # plain HTTP here: a Secure cookie would never come back
    page = await con.client.get("/console")
    assert page.status_code == 200
    assert "fake-model" in page.text and "root" in page.text
    # the id is random, and nothing of the key is in it
    sid = con.client.cookies[SESSION_COOKIE]
    assert len(sid) >= 40 and con.admin not in sid


async def test_cookie_is_secure_when_serving_https(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("unused here")
    async with console_app(tmp_path, ssl_certfile=cert) as con:
        r = await con.login(con.admin)
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE))
        assert "secure" in {part.strip().lower() for part in cookie.split(";")}


async def test_wrong_and_user_keys_are_refused(con):
    r = await con.login("llmh_nope_nope")
    assert r.status_code == 401
    assert "not valid" in r.text
    assert SESSION_COOKIE not in con.client.cookies
    r = await con.login("x" * 5000)
    assert r.status_code == 400
    r = await con.login(con.user)
    assert r.status_code == 403
    assert "not an admin key" in r.text
    assert SESSION_COOKIE not in con.client.cookies
    assert (await con.client.get("/console")).status_code == 303


async def test_login_needs_its_form_token(con):
    r = await con.client.post("/console/login", data={"key": con.admin})
    assert r.status_code == 403
    await con.client.get("/console/login")  # a token cookie, but the form's is another
    r = await con.client.post("/console/login", data={"key": con.admin, "csrf": "forged"})
    assert r.status_code == 403
    assert SESSION_COOKIE not in con.client.cookies


async def test_every_console_response_has_the_security_headers(con):
    for path in ("/console/login", "/console", "/console/static/console.css", "/console/nope"):
        r = await con.client.get(path)
        assert r.headers["content-security-policy"] == CSP, path
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP
    assert "default-src 'self'" in CSP
    await con.login(con.admin)
    for path in ("/console", "/console/audit", "/console/playground", "/console/live"):
        r = await con.client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP, path
        # no inline script or style: every script and stylesheet comes from /console/static
        assert "<style" not in r.text and " style=" not in r.text, path
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), path


async def test_posts_without_the_csrf_token_are_refused(con):
    await con.login(con.admin)
    for path in (
        "/console/logout",
        "/console/models/fake-model/unload",
        "/console/audit/verify",
    ):
        r = await con.client.post(path, data={})
        assert r.status_code == 403, path
        r = await con.client.post(path, data={"csrf": "wrong"})
        assert r.status_code == 403, path
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = await con.client.post("/console/playground/chat", json=chat)
    assert r.status_code == 403
    r = await con.client.post(
        "/console/playground/chat", json=chat, headers={"X-CSRF-Token": "wrong"}
    )
    assert r.status_code == 403
    # nothing happened: the model is still loaded, the session still live
    assert con.app.state.pool.status()[0]["state"] == "loaded"
    assert (await con.client.get("/console")).status_code == 200


async def test_expired_tampered_and_ended_sessions(con):
    await con.login(con.admin)
    sid = con.client.cookies[SESSION_COOKIE]
    sessions = con.app.state.console_app.state.console.sessions
    # tampered: one character changed
    con.use_session(sid[:-1] + ("A" if sid[-1] != "A" else "B"))
    r = await con.client.get("/console")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert (await con.client.get("/console/live")).status_code == 401
    # expired
    con.use_session(sid)
    assert (await con.client.get("/console")).status_code == 200
    sessions.get(sid).expires = 0
    assert (await con.client.get("/console")).status_code == 303
    assert sessions.get(sid) is None
    # ended by logout: the old cookie is worth nothing afterwards
    await con.login(con.admin)
    sid = con.client.cookies[SESSION_COOKIE]
    token = await con.csrf()
    r = await con.client.post("/console/logout", data={"csrf": token})
    assert r.status_code == 303
    con.use_session(sid)
    assert (await con.client.get("/console")).status_code == 303


async def test_admins_see_and_end_sessions(con):
    """The sessions page lists every live login; ending another's session sends its next
    request to the login page, ending one's own is logging out; CSRF is checked."""
    await con.login(con.admin)
    mine = con.client.cookies[SESSION_COOKIE]
    sessions = con.app.state.console_app.state.console.sessions
    keys = KeyStore(con.app.state.settings.keys_db)
    other_key, _ = keys.create("carol", "admin")
    keys.close()
    con.client.cookies.clear()  # another browser
    await con.login(other_key)
    theirs = con.client.cookies[SESSION_COOKIE]
    assert theirs != mine
    con.use_session(mine)
    page = await con.client.get("/console/sessions")
    assert page.status_code == 200
    assert 'data-user="root"' in page.text and 'data-user="carol"' in page.text
    assert mine not in page.text and theirs not in page.text  # ids (cookies) never shown
    carol = sessions.get(theirs)
    token = CSRF.search(page.text).group(1)
    r = await con.client.post(f"/console/sessions/{carol.handle}/end", data={"csrf": "x"})
    assert r.status_code == 403 and sessions.get(theirs) is not None
    r = await con.client.post(f"/console/sessions/{carol.handle}/end", data={"csrf": token})
    assert r.status_code == 303 and sessions.get(theirs) is None
    assert "Ended the session of carol" in (await con.client.get("/console/sessions")).text
    r = await con.client.post(f"/console/sessions/{carol.handle}/end", data={"csrf": token})
    assert "already ended" in (await con.client.get("/console/sessions")).text
    con.use_session(theirs)
    assert (await con.client.get("/console")).status_code == 303
    con.use_session(mine)
    own = sessions.get(mine).handle
    r = await con.client.post(f"/console/sessions/{own}/end", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert (await con.client.get("/console")).status_code == 303


async def test_revoking_the_key_ends_its_console_sessions(con):
    """A session made with an API key ends once the key is revoked, also when another
    process (`llmhost keys revoke`) revokes it."""
    keys = KeyStore(con.app.state.settings.keys_db)  # another connection, as the CLI's
    key, info = keys.create("dana", "admin")
    await con.login(key)
    assert (await con.client.get("/console")).status_code == 200
    keys.revoke(info.key_id)
    keys.close()
    r = await con.client.get("/console")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert len(con.app.state.console_app.state.console.sessions) == 0
    assert (await con.client.get("/console/live")).status_code == 401


async def test_session_lifetime_comes_from_settings(tmp_path):
    async with console_app(tmp_path, console_session_lifetime="90s") as con:
        r = await con.login(con.admin)
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE))
        assert "max-age=90" in cookie.lower()
        sessions = con.app.state.console_app.state.console.sessions
        assert sessions.lifetime_s == 90


async def test_session_cookie_is_no_credential_on_the_api(con):
    await con.login(con.admin)
    sid = con.client.cookies[SESSION_COOKIE]
    # sent explicitly on every path: the browser would not (Path=/console), a script might
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/admin/models"),
        ("POST", "/v1/admin/models/fake-model/unload"),
        ("GET", "/v1/admin/audit"),
    ):
        r = await con.client.request(method, path, headers={"Cookie": f"{SESSION_COOKIE}={sid}"})
        assert r.status_code == 401, (path, r.text)
    r = await con.client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Cookie": f"{SESSION_COOKIE}={sid}"},
    )
    assert r.status_code == 401
    assert con.app.state.pool.status()[0]["state"] == "loaded"


async def test_markup_in_model_ids_and_prompts_is_text(con):
    r = await con.client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": f"say {EVIL}"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {con.user}"},
    )
    assert r.status_code == 200, r.text
    store = con.app.state.audit.store
    for _ in range(200):
        if store.search(user="bob"):
            break
        await asyncio.sleep(0.02)
    await con.login(con.admin)
    for path in ("/console", "/console/audit?user=bob", "/console/playground"):
        page = await con.client.get(path)
        assert EVIL not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path


async def test_unload_and_load_from_the_overview(con):
    await con.login(con.admin)
    token = await con.csrf()
    r = await con.client.post("/console/models/fake-model/unload", data={"csrf": token})
    assert r.status_code == 303
    pool = con.app.state.pool
    assert pool.status()[0]["state"] == "unloaded"
    assert "Unloaded fake-model" in (await con.client.get("/console")).text
    r = await con.client.post("/console/models/fake-model/load", data={"csrf": token})
    assert r.status_code == 303
    for _ in range(200):
        if pool.status()[0]["state"] == "loaded":
            break
        await asyncio.sleep(0.02)
    assert pool.status()[0]["state"] == "loaded"
    r = await con.client.post("/console/models/no-such-model/load", data={"csrf": token})
    assert r.status_code == 303
    assert "no-such-model" in (await con.client.get("/console")).text
    r = await con.client.post("/console/models/fake-model/delete", data={"csrf": token})
    assert r.status_code == 404
    con.app.state.ready = False  # starting up: refused as the admin endpoints refuse
    r = await con.client.post("/console/models/fake-model/unload", data={"csrf": token})
    assert r.status_code == 303
    assert "still starting" in (await con.client.get("/console")).text
    assert pool.status()[0]["state"] == "loaded"
    con.app.state.ready = True


async def test_playground_streams_for_the_admin_and_is_audited(con):
    await con.login(con.admin)
    token = await con.csrf("/console/playground")
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with con.client.stream(
        "POST", "/console/playground/chat", json=body, headers={"X-CSRF-Token": token}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["content-security-policy"] == CSP
        text = "".join([chunk async for chunk in r.aiter_text()])
    assert text.count("data: ") >= 3 and "data: [DONE]" in text
    # the server's times of the answer's tokens come last, for the page's tokens/s
    assert text.endswith("\n\n") and "event: timing\ndata: " in text
    times = json.loads(text.rsplit("event: timing\ndata: ", 1)[1])
    assert times["first_token_ms"] >= 0 and times["decode_ms"] >= 0, times
    store = con.app.state.audit.store
    for _ in range(200):
        if store.search(user="root"):
            break
        await asyncio.sleep(0.02)
    (rec,) = store.search(user="root")
    assert rec.route == "/v1/chat/completions" and rec.model == "fake-model"
    # the API's own errors come back as they are
    r = await con.client.post(
        "/console/playground/chat",
        json={**body, "model": "no-such-model"},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 404
    assert "no-such-model" in r.json()["error"]["message"]


async def test_audit_page_searches_pages_and_checks_the_chain(con):
    for i in range(3):
        r = await con.client.post(
            "/v1/completions",
            json={"prompt": f"prompt {i} mail me at a@b.example", "max_tokens": 1},
            headers={"Authorization": f"Bearer {con.user}"},
        )
        assert r.status_code == 200
    store = con.app.state.audit.store
    for _ in range(200):
        if len(store.search(user="bob")) == 3:
            break
        await asyncio.sleep(0.02)
    await con.login(con.admin)
    page = (await con.client.get("/console/audit?user=bob")).text
    assert page.count("/v1/completions") == 3
    assert "a@b.example" not in page  # redacted
    assert "Not checked" in page
    assert "No records match" in (await con.client.get("/console/audit?user=carol")).text
    bad = await con.client.get("/console/audit?status=abc&since=yesterday")
    assert bad.status_code == 200 and 'class="error"' in bad.text
    token = await con.csrf("/console/audit")
    r = await con.client.post("/console/audit/verify", data={"csrf": token})
    assert r.status_code == 303
    page = (await con.client.get("/console/audit")).text
    assert "Intact: 3 records checked" in page


async def test_audit_pages_are_bounded(con, monkeypatch):
    import llmhost.api.console.audit as audit_mod

    monkeypatch.setattr(audit_mod, "PAGE_SIZE", 2)
    for i in range(5):
        await con.client.post(
            "/v1/completions",
            json={"prompt": f"p{i}", "max_tokens": 1},
            headers={"Authorization": f"Bearer {con.user}"},
        )
    store = con.app.state.audit.store
    for _ in range(200):
        if len(store.search(user="bob")) == 5:
            break
        await asyncio.sleep(0.02)
    await con.login(con.admin)
    first = (await con.client.get("/console/audit?user=bob")).text
    assert 'rel="next"' in first and 'rel="prev"' not in first
    assert first.count("<td>bob</td>") == 2
    last = (await con.client.get("/console/audit?user=bob&page=3")).text
    assert last.count("<td>bob</td>") == 1 and 'rel="next"' not in last
    huge = await con.client.get("/console/audit?user=bob&page=99999999")
    assert huge.status_code == 200


async def test_with_auth_metrics_and_audit_off(tmp_path):
    async with console_app(tmp_path, auth=False, metrics=False, audit=False) as con:
        page = await con.client.get("/console/login")
        assert "Authentication is off" in page.text and 'name="key"' not in page.text
        r = await con.login("")
        assert r.status_code == 303
        page = await con.client.get("/console")
        assert "anonymous" in page.text and "Metrics are off" in page.text
        assert "<svg" not in page.text
        assert "audit log is off" in (await con.client.get("/console/audit")).text
        token = await con.csrf()
        r = await con.client.post("/console/audit/verify", data={"csrf": token})
        assert r.status_code == 303


async def test_login_failures_count_towards_the_clients_limit(tmp_path):
    async with console_app(tmp_path, auth_failures_per_minute=2) as con:
        for _ in range(2):
            assert (await con.login("llmh_bad_key")).status_code == 401
        r = await con.login(con.admin)  # even the right key, once the limit is reached
        assert r.status_code == 429
        assert SESSION_COOKIE not in con.client.cookies
        # the API counts the same failures: a Bearer request from this client is refused too
        r = await con.client.get("/v1/models", headers={"Authorization": f"Bearer {con.admin}"})
        assert r.status_code == 429


async def test_usage_page_and_csv_per_user_model_and_day(con):
    h = {"Authorization": f"Bearer {con.user}"}
    for model in ("fake-model", "fake-model", EVIL):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = await con.client.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 200, r.text
    assert (await con.client.get("/console/usage")).status_code == 303  # login first
    await con.login(con.admin)
    page = await con.client.get("/console/usage", params={"group_by": "user"})
    assert page.status_code == 200
    row = re.search(r"<tr><td>bob</td><td>(\d+)</td>", page.text)
    assert row is not None and int(row.group(1)) == 3, page.text
    page = await con.client.get("/console/usage", params={"group_by": "model"})
    assert EVIL not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    csv_link = re.search(r'id="csv" href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    export = await con.client.get(csv_link)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    assert "attachment" in export.headers["content-disposition"]
    lines = export.text.strip().splitlines()
    assert lines[0] == "model,requests,prompt_tokens,completion_tokens,total_tokens"
    counts = {line.split(",")[0]: int(line.split(",")[1]) for line in lines[1:]}
    assert counts == {"fake-model": 2, EVIL: 1}
    day = await con.client.get("/console/usage")  # per day by default
    assert re.search(r"<tr><td>\d{4}-\d\d-\d\d</td><td>3</td>", day.text), day.text


async def test_usage_page_refuses_bad_ranges_and_groupings_with_a_message(con):
    await con.login(con.admin)
    for params, said in (
        ({"since": "2016-01-01", "until": "2026-01-01"}, "at most 366 days"),
        ({"since": "yesterday"}, "YYYY-MM-DD"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "after until"),
        ({"group_by": "<b>team</b>"}, "group by one of"),
    ):
        page = await con.client.get("/console/usage", params=params)
        assert page.status_code == 200 and said in page.text, (params, page.text[-800:])
        assert "<b>team</b>" not in page.text
        export = await con.client.get("/console/usage.csv", params=params)
        assert export.status_code == 400 and said in export.text


async def test_keys_page_creates_rotates_and_revokes(con):
    await con.login(con.admin)
    page = await con.client.get("/console/keys")
    assert page.status_code == 200 and "bob" in page.text and "root" in page.text
    token = CSRF.search(page.text).group(1)
    form = {
        "csrf": token,
        "user": "carol",
        "role": "user",
        "expires": "30d",
        "rpm": "60",
        "models": "fake-model",
        "tokens_per_day": "1000",
        "requests_per_day": "0",
    }
    r = await con.client.post("/console/keys", data=form)
    assert r.status_code == 303
    page = await con.client.get("/console/keys")
    secret = re.search(r'id="new-secret">([^<]+)<', page.text).group(1)
    assert "not shown again" in page.text and "carol" in page.text
    again = await con.client.get("/console/keys")
    assert secret not in again.text  # shown once
    key_id = secret.split("_")[1]
    row = re.search(rf'<tr id="key-{key_id}">(.*?)</tr>', again.text, re.S).group(1)
    assert "fake-model" in row and "1000" in row and "60" in row
    h = {"Authorization": f"Bearer {secret}"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    r = await con.client.post("/v1/chat/completions", json=body, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"  # 0/day

    # rotate with a grace: both secrets authenticate
    r = await con.client.post(f"/console/keys/{key_id}/rotate", data={"csrf": token, "grace": "1h"})
    assert r.status_code == 303
    page = await con.client.get("/console/keys")
    new = re.search(r'id="new-secret">([^<]+)<', page.text).group(1)
    assert new != secret and "old one works until" in page.text
    for s in (secret, new):
        r = await con.client.get("/v1/models", headers={"Authorization": f"Bearer {s}"})
        assert r.status_code == 200, r.text
    # revoke ends both
    r = await con.client.post(f"/console/keys/{key_id}/revoke", data={"csrf": token})
    assert r.status_code == 303
    for s in (secret, new):
        r = await con.client.get("/v1/models", headers={"Authorization": f"Bearer {s}"})
        assert r.status_code == 401
    page = await con.client.get("/console/keys")
    assert "revoked" in page.text
    # every change is an audit record of the admin who made it
    store = con.app.state.audit.store
    want = {"/v1/admin/keys", f"/v1/admin/keys/{key_id}/rotate", f"/v1/admin/keys/{key_id}/revoke"}
    for _ in range(200):
        if want <= {r.route for r in store.search(user="root")}:
            break
        await asyncio.sleep(0.02)
    assert want <= {r.route for r in store.search(user="root")}


async def test_keys_page_refuses_bad_forms_and_missing_tokens(con):
    await con.login(con.admin)
    token = await con.csrf("/console/keys")
    for form, said in (
        ({"user": "has space"}, "printable"),
        ({"user": "x", "role": "root"}, "role is user or admin"),
        ({"user": "x", "rpm": "-1"}, "rpm is a whole number"),
        ({"user": "x", "tokens_per_day": "1e9"}, "tokens per day is a whole number"),
        ({"user": "x", "expires": "soon"}, "expires is a duration"),
        ({"user": "x", "expires": "500000d"}, "at most"),
    ):
        r = await con.client.post("/console/keys", data={"csrf": token, **form})
        assert r.status_code == 303
        page = await con.client.get("/console/keys")
        assert said in page.text and "No key made" in page.text, (form, page.text[-600:])
        assert EVIL not in page.text
    r = await con.client.post("/console/keys", data={"csrf": token, "user": EVIL})
    page = (await con.client.get("/console/keys")).text
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # as text
    r = await con.client.post("/console/keys", data={"user": "nocsrf"})
    assert r.status_code == 403
    r = await con.client.post("/console/keys/nope/revoke", data={"csrf": token})
    assert r.status_code == 303
    assert "no API key" in (await con.client.get("/console/keys")).text
    r = await con.client.post(f"/console/keys/x/{'delete'}", data={"csrf": token})
    assert r.status_code == 404
    r = await con.client.post("/console/keys/x/rotate", data={"csrf": token, "grace": "400d"})
    assert "at most 30 days" in (await con.client.get("/console/keys")).text
    # a user key never reaches the page
    con.client.cookies.clear()
    assert (await con.login(con.user)).status_code == 403
    assert (await con.client.get("/console/keys")).status_code == 303


async def test_keys_page_shows_a_page_at_a_time_and_finds_a_user_or_id(tmp_path):
    async with console_app(tmp_path) as con:
        keys = con.app.state.authenticator.keys
        made = [keys.create(f"u{i:03d}", "user")[1] for i in range(230)]
        await con.login(con.admin)

        def ids(text: str) -> list[str]:
            return re.findall(r'<tr id="key-([0-9a-f]+)">', text)

        first = await con.client.get("/console/keys")
        newest = [k.key_id for k in sorted(made, key=lambda k: k.created, reverse=True)]
        assert ids(first.text) == newest[:100]  # newest first, 100 to a page
        assert 'rel="next" href="/console/keys?page=2"' in first.text
        assert 'rel="prev"' not in first.text
        third = await con.client.get("/console/keys", params={"page": "3"})
        assert len(ids(third.text)) == 32  # 230 made, and root's and bob's
        assert 'rel="next"' not in third.text and 'href="/console/keys?page=2"' in third.text
        seen = ids(first.text) + ids((await con.client.get("/console/keys?page=2")).text)
        assert len(set(seen + ids(third.text))) == 232

        by_user = await con.client.get("/console/keys", params={"q": "u017"})
        assert ids(by_user.text) == [made[17].key_id]
        by_id = await con.client.get("/console/keys", params={"q": made[5].key_id[:8]})
        assert made[5].key_id in ids(by_id.text)
        assert all(k.startswith(made[5].key_id[:8]) for k in ids(by_id.text))
        none = await con.client.get("/console/keys", params={"q": "<nobody>"})
        assert ids(none.text) == [] and "No key of that user or id." in none.text
        assert "&lt;nobody&gt;" in none.text
        odd = await con.client.get("/console/keys", params={"page": "x9"})
        assert ids(odd.text) == newest[:100]


async def test_a_jwt_login_ends_when_the_token_does(tmp_path):
    import time

    import jwt

    secret = "s" * 40
    async with console_app(tmp_path, jwt_secret=secret) as con:
        exp = int(time.time()) + 120
        token = jwt.encode({"sub": "erin", "role": "admin", "exp": exp}, secret, "HS256")
        r = await con.login(token)
        assert r.status_code == 303, r.text
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE))
        max_age = int(cookie.lower().split("max-age=")[1].split(";")[0])
        assert 100 <= max_age <= 120  # not the 8 hours a key's login gets
        sessions = con.app.state.console_app.state.console.sessions
        (session,) = sessions.live()
        assert session.expires == exp and session.principal.via == "jwt"
        assert (await con.client.get("/console")).status_code == 200
        session.expires = time.time() - 1  # the token's exp has passed
        assert (await con.client.get("/console")).status_code == 303
