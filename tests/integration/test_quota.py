"""Quotas and usage through the app: 429 quota_exceeded naming the quota and its reset, tokens
charged from each response's real usage, per key, user (settings) and model, one budget
shared by two instances through Redis, the admin usage endpoint (JSON, CSV, range refused)
and `llmhost usage` against a live server, and usage kept across a stop."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from datetime import datetime, timezone

import httpx
import pytest
from typer.testing import CliRunner

from llmhost.api import create_app
from llmhost.cli.main import app as cli
from llmhost.config import QuotaEntry, Settings, load_settings
from llmhost.engines.fake import FakeEngine
from llmhost.engines.pool import ModelSpec, Pool
from llmhost.errors import ConfigError
from llmhost.security.auth import KeyStore
from llmhost.security.quota import Admission, Quota, QuotaExceeded, Quotas
from llmhost.security.usage import UsageRow, UsageStore
from tests.integration.test_hardening import LiveServer
from tests.integration.test_ratelimit import redis_url  # noqa: F401 (a fixture)

COMPLETION = {"prompt": "one two three", "max_tokens": 4}  # 3 + 4 = 7 tokens


def _settings(tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path, audit=False, rate_limit_rps=0, **kw)


def _keys(settings: Settings, *specs: tuple[str, str, Quota]) -> list[str]:
    store = KeyStore(settings.keys_db)
    made = [store.create(user, role, quota=q)[0] for user, role, q in specs]  # type: ignore[arg-type]
    store.close()
    return made


async def _serve(app, calls):
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await calls(c)


def _next_midnight() -> float:
    now = datetime.now(timezone.utc)
    return datetime(now.year, now.month, now.day, tzinfo=timezone.utc).timestamp() + 86400


async def test_a_keys_tokens_per_day_from_real_usage(tmp_path):
    s = _settings(tmp_path)
    key, admin = _keys(s, ("alice", "user", Quota(tokens_per_day=20)), ("ops", "admin", Quota()))
    app = create_app(FakeEngine(script=["a", " b", " c", " d"]), s)
    h = {"Authorization": f"Bearer {key}"}

    async def calls(c):
        codes = []
        for _ in range(4):
            r = await c.post("/v1/completions", json=COMPLETION, headers=h)
            codes.append(r.status_code)
        used = await app.state.quotas.used("key", key.split("_")[1], "tokens/day")
        ops = {"Authorization": f"Bearer {admin}"}
        usage = await c.get("/v1/admin/usage", params={"group_by": "user"}, headers=ops)
        return codes, r, used, usage

    codes, refused, used, usage = await _serve(app, calls)
    assert codes == [200, 200, 200, 429]  # 21 tokens used of 20: the fourth is refused
    assert used == 21
    err = refused.json()["error"]
    assert err["code"] == "quota_exceeded" and err["type"] == "rate_limit_error"
    day_end = datetime.fromtimestamp(_next_midnight(), timezone.utc)
    assert "key" in err["message"] and "20 tokens/day" in err["message"]
    assert f"resets at {day_end:%Y-%m-%dT%H:%M:%SZ}" in err["message"]
    retry = int(refused.headers["retry-after"])
    assert abs(retry - (_next_midnight() - time.time())) <= 2
    # usage counts the three requests that ran, not the refused one
    assert usage.json()["data"] == [
        {
            "user": "alice",
            "requests": 3,
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
        }
    ]


def _broken() -> FakeEngine:
    raise RuntimeError("no such weights")


async def test_a_request_that_never_ran_is_not_counted(tmp_path):
    s = _settings(tmp_path)
    (key,) = _keys(s, ("erin", "user", Quota(requests_per_day=1)))
    pool = Pool(
        [
            ModelSpec(id="ok", build=lambda: FakeEngine(model_id="ok")),
            ModelSpec(id="broken", build=_broken),
        ]
    )
    app = create_app(pool, s)
    h = {"Authorization": f"Bearer {key}"}

    async def calls(c):
        bad = await c.post("/v1/completions", json={**COMPLETION, "model": "broken"}, headers=h)
        used = await app.state.quotas.used("key", key.split("_")[1], "requests/day")
        ok = await c.post("/v1/completions", json={**COMPLETION, "model": "ok"}, headers=h)
        over = await c.post("/v1/completions", json={**COMPLETION, "model": "ok"}, headers=h)
        return bad, used, ok, over

    bad, used, ok, over = await _serve(app, calls)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "model_load_error"
    assert used == 0  # counted, then taken back when its model could not be leased
    assert (ok.status_code, over.status_code) == (200, 429)


async def test_user_quotas_from_settings_and_quota_zero(tmp_path):
    s = _settings(
        tmp_path,
        quota_requests_per_day=2,
        quota_users={
            "vip": QuotaEntry(requests_per_day=5),
            "blocked": QuotaEntry(tokens_per_day=0),
        },
    )
    plain, vip, blocked = _keys(
        s, ("plain", "user", Quota()), ("vip", "user", Quota()), ("blocked", "user", Quota())
    )
    app = create_app(FakeEngine(script=["a"]), s)

    async def calls(c):
        out = {}
        for name, key in (("plain", plain), ("vip", vip), ("blocked", blocked)):
            h = {"Authorization": f"Bearer {key}"}
            out[name] = [
                (await c.post("/v1/completions", json=COMPLETION, headers=h)) for _ in range(6)
            ]
        models = await c.get("/v1/models", headers={"Authorization": f"Bearer {plain}"})
        return out, models

    out, models = await _serve(app, calls)
    assert [r.status_code for r in out["plain"]] == [200, 200, 429, 429, 429, 429]
    assert "user 'plain' has 2 requests/day" in out["plain"][2].json()["error"]["message"]
    assert [r.status_code for r in out["vip"]] == [200] * 5 + [429]
    assert [r.status_code for r in out["blocked"]] == [429] * 6
    assert "user 'blocked' has 0 tokens/day" in out["blocked"][0].json()["error"]["message"]
    assert models.status_code == 200  # only generations count against quotas


async def test_a_models_quota_counts_every_user(tmp_path):
    s = _settings(tmp_path)
    a, b = _keys(s, ("a", "user", Quota()), ("b", "user", Quota()))
    pool = Pool(
        [
            ModelSpec(
                id="small", build=lambda: FakeEngine(model_id="small"), quota=(None, None, 3)
            ),
            ModelSpec(id="big", build=lambda: FakeEngine(model_id="big")),
        ]
    )
    app = create_app(pool, s)

    def chat(model):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def calls(c):
        codes = []
        for key in (a, b, a, b, a):
            h = {"Authorization": f"Bearer {key}"}
            codes.append(await c.post("/v1/chat/completions", json=chat("small"), headers=h))
        big = await c.post(
            "/v1/chat/completions", json=chat("big"), headers={"Authorization": f"Bearer {a}"}
        )
        return codes, big

    codes, big = await _serve(app, calls)
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    assert "model 'small' has 3 requests/day" in codes[3].json()["error"]["message"]
    assert big.status_code == 200


def test_model_quotas_flow_from_config_into_the_pool(tmp_path, monkeypatch):
    from llmhost.ops.serve_models import build_pool, served

    (tmp_path / "m1.gguf").write_bytes(b"")
    (tmp_path / "config.toml").write_text(
        f'[models.m1]\nsource = "{tmp_path / "m1.gguf"}"\nengine = "fake"\n'
        "quota_tokens_per_month = 1000\n"
    )
    monkeypatch.setenv("LLMHOST_CONFIG", str(tmp_path / "config.toml"))
    settings = load_settings(home=tmp_path)
    assert settings.models["m1"].quota_tokens_per_month == 1000
    pool = build_pool(settings, served(settings, []))
    assert pool.specs[0].quota == (None, 1000, None)


def test_negative_quotas_are_refused_by_config_and_cli(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("quota_tokens_per_day = -5\n")
    monkeypatch.setenv("LLMHOST_CONFIG", str(tmp_path / "config.toml"))
    with pytest.raises(ConfigError, match="quota_tokens_per_day"):
        load_settings(home=tmp_path)
    (tmp_path / "config.toml").write_text("[quota_users.bob]\nrequests_per_day = -1\n")
    with pytest.raises(ConfigError, match=r"quota_users\.bob\.requests_per_day"):
        load_settings(home=tmp_path)
    monkeypatch.delenv("LLMHOST_CONFIG")
    env = {"LLMHOST_HOME": str(tmp_path / "cli"), "COLUMNS": "200"}
    runner = CliRunner()
    bad = runner.invoke(cli, ["keys", "create", "--user", "x", "--tokens-per-day", "-1"], env=env)
    assert bad.exit_code == 2 and "greater than or equal to 0" in bad.output
    ok = runner.invoke(
        cli,
        ["keys", "create", "--user", "x", "--requests-per-day", "0", "--tokens-per-month", "9"],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    listed = json.loads(runner.invoke(cli, ["keys", "list", "--json"], env=env).stdout)
    assert listed[0]["quota"] == {
        "tokens_per_day": None,
        "tokens_per_month": 9,
        "requests_per_day": 0,
    }
    help_text = runner.invoke(cli, ["keys", "create", "--help"], env={"COLUMNS": "200"}).output
    assert "0: refuse every request" in help_text


async def test_instances_share_quotas_through_redis(tmp_path, redis_url):  # noqa: F811
    s = _settings(tmp_path, redis_url=redis_url)
    (key,) = _keys(s, ("shared", "user", Quota(requests_per_day=3, tokens_per_day=1000)))
    a = create_app(FakeEngine(script=["a"]), s)
    b = create_app(FakeEngine(script=["a"]), s)
    h = {"Authorization": f"Bearer {key}"}
    async with a.router.lifespan_context(a), b.router.lifespan_context(b):
        while not (a.state.ready and b.state.ready):
            await asyncio.sleep(0.01)
        ca = httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://a", headers=h)
        cb = httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://b", headers=h)
        async with ca, cb:
            codes = []
            for c in (ca, cb, ca, cb):
                codes.append((await c.post("/v1/completions", json=COMPLETION)).status_code)
            key_id = key.split("_")[1]
            await a.state.quotas.drain()  # charges to Redis run beside the requests
            await b.state.quotas.drain()
            tokens = await b.state.quotas.used("key", key_id, "tokens/day")
    assert codes == [200, 200, 200, 429]
    assert tokens == 3 * 7  # each charged by the instance that served it


async def test_redis_admissions_are_exact_across_instances_under_contention(redis_url):  # noqa: F811
    """Two instances admit 400 concurrent requests against one budget of 137 a day: exactly
    137 pass (check and count are one script), and a refused one counts nothing."""
    ns = f"exact-{time.time_ns()}"
    a, b = Quotas(redis_url, namespace=ns), Quotas(redis_url, namespace=ns)
    quota = Quota(requests_per_day=137, tokens_per_day=10**9)
    targets = [("key", "k", quota), ("user", "u", Quota(requests_per_day=10**6))]
    got = await asyncio.gather(*(q.admit(targets) for q in [a, b] * 200))
    admitted = [r for r in got if isinstance(r, Admission)]
    assert len(admitted) == 137
    assert {r.unit for r in got if isinstance(r, QuotaExceeded)} == {"requests/day"}
    assert await a.used("key", "k", "requests/day") == 137
    assert await b.used("user", "u", "requests/day") == 137  # the refused counted nowhere
    for r in admitted[:10]:
        await a.charge_soon(r, 5)
    await a.refund(admitted[0])
    await a.drain()
    assert await b.used("key", "k", "tokens/day") == 50
    assert await b.used("key", "k", "requests/day") == 136
    tight = [("model", "m", Quota(tokens_per_day=49))]
    first = await a.admit(tight)
    assert isinstance(first, Admission)
    await b.charge_soon(first, 49)
    await b.drain()
    refused = await b.admit(tight)
    assert isinstance(refused, QuotaExceeded) and refused.unit == "tokens/day"


async def test_usage_endpoint_csv_range_and_admins_only(tmp_path):
    s = _settings(tmp_path)
    user, admin = _keys(s, ("carol", "user", Quota()), ("ops", "admin", Quota()))
    app = create_app(FakeEngine(script=["a"]), s)
    ops = {"Authorization": f"Bearer {admin}"}

    async def calls(c):
        for _ in range(2):
            await c.post(
                "/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {user}"}
            )
        as_csv = await c.get("/v1/admin/usage?group_by=model&format=csv", headers=ops)
        ten_years = await c.get("/v1/admin/usage?since=2016-01-01&until=2026-01-01", headers=ops)
        bad_group = await c.get("/v1/admin/usage?group_by=ip", headers=ops)
        as_user = await c.get("/v1/admin/usage", headers={"Authorization": f"Bearer {user}"})
        return as_csv, ten_years, bad_group, as_user

    as_csv, ten_years, bad_group, as_user = await _serve(app, calls)
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == 1 and rows[0]["requests"] == "2" and rows[0]["total_tokens"] == "14"
    assert ten_years.status_code == 400
    assert "at most 366 days" in ten_years.json()["error"]["message"]
    assert bad_group.status_code in (400, 422)
    assert as_user.status_code == 403
    # the server has stopped: what it counted is on disk
    store = UsageStore(s.usage_db)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert [(r.group, r.requests) for r in store.query(today, today, "user", 10)] == [("carol", 2)]
    store.close()


async def test_usage_cli_against_a_live_server(tmp_path):
    s = _settings(tmp_path)
    user, admin = _keys(s, ("dave", "user", Quota()), ("ops", "admin", Quota()))
    app = create_app(FakeEngine(script=["a"]), s)
    runner = CliRunner()

    def usage(*args: str):
        return runner.invoke(
            cli, ["usage", "--url", srv.url, "--api-key", admin, *args], env={"COLUMNS": "200"}
        )

    async with LiveServer(app) as srv:
        while not app.state.ready:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=srv.url) as c:
            h = {"Authorization": f"Bearer {user}"}
            for _ in range(3):
                assert (
                    await c.post("/v1/completions", json=COMPLETION, headers=h)
                ).status_code == 200
        table = await asyncio.to_thread(usage, "--group-by", "user")
        as_json = await asyncio.to_thread(usage, "--json", "-g", "key")
        as_csv = await asyncio.to_thread(usage, "--csv", "-g", "user")
        refused = await asyncio.to_thread(usage, "--since", "2015-01-01", "--until", "2025-12-31")
    assert table.exit_code == 0, table.output
    assert "dave" in table.output and "21" in table.output
    body = json.loads(as_json.stdout)
    assert body["data"][0]["key"] == user.split("_")[1] and body["data"][0]["requests"] == 3
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows == [
        {
            "user": "dave",
            "requests": "3",
            "prompt_tokens": "9",
            "completion_tokens": "12",
            "total_tokens": "21",
        }
    ]
    assert refused.exit_code != 0 and "at most 366 days" in str(refused.exception or "")


async def test_usage_is_written_on_shutdown_and_streams_are_charged(tmp_path):
    s = _settings(tmp_path)
    (key,) = _keys(s, ("fay", "user", Quota(tokens_per_day=1000)))
    app = create_app(FakeEngine(script=["a", " b", " c", " d"]), s)
    app.state.usage.every = 3600  # nothing written in the background: only the final write
    h = {"Authorization": f"Bearer {key}"}

    async def calls(c):
        async with c.stream(
            "POST", "/v1/completions", json={**COMPLETION, "stream": True}, headers=h
        ) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                pass
        await c.post("/v1/completions", json=COMPLETION, headers=h)
        early = UsageStore(s.usage_db)  # another reader: nothing written yet
        assert early.query("2000-01-01", "2100-01-01", "day", 10) == []
        early.close()
        return await app.state.quotas.used("key", key.split("_")[1], "tokens/day")

    tokens = await _serve(app, calls)
    assert tokens == 14  # the stream's 7 too
    store = UsageStore(s.usage_db)
    rows = store.query("2000-01-01", "2100-01-01", "user", 10)
    store.close()
    assert rows == [UsageRow("fay", 2, 6, 8)]


async def test_redis_charges_are_sent_together_and_none_is_left_behind(redis_url):  # noqa: F811
    """Twenty requests ending together cost Redis one script for their tokens, and a charge
    that comes while that script is on its way is sent after it, without waiting for another
    request to end or for shutdown."""
    q = Quotas(redis_url, namespace=f"coalesce-{time.time_ns()}")
    quota = Quota(tokens_per_day=10**9, tokens_per_month=10**9)
    admitted = [await q.admit([("key", "k", quota)]) for _ in range(20)]
    assert all(isinstance(a, Admission) for a in admitted)
    sent: list[list[tuple[str, int, int]]] = []
    add = q.counters.add

    async def watched_add(additions):
        sent.append(additions)
        if len(sent) == 1:
            await q.charge_soon(admitted[0], 3)  # ends while the first batch is on its way
        await add(additions)

    q.counters.add = watched_add
    for a in admitted:
        await q.charge_soon(a, 5)
    await asyncio.sleep(0.2)  # no drain: the sender finishes on its own
    assert [sorted(n for _, n, _ in batch) for batch in sent] == [[100, 100], [3, 3]]
    assert await q.used("key", "k", "tokens/day") == 103
    assert await q.used("key", "k", "tokens/month") == 103
    await q.drain()
    assert len(sent) == 2  # nothing was left to send


async def test_redis_charges_survive_an_outage_and_shutdown_never_raises(redis_url, caplog):  # noqa: F811
    """Sends that fail keep their charges for the next send; the outage is logged once; on
    shutdown `drain` sends what it can and logs what it cannot, without raising (the rest of
    shutdown, usage and the key store, must still run)."""
    q = Quotas(redis_url, namespace=f"outage-{time.time_ns()}")
    quota = Quota(tokens_per_day=10**9)
    first = await q.admit([("key", "k", quota)])
    assert isinstance(first, Admission)
    add = q.counters.add
    down = True

    async def flaky_add(additions):
        if down:
            raise ConnectionError("redis down")
        await add(additions)

    q.counters.add = flaky_add
    for tokens in (5, 6, 7):
        await q.charge_soon(first, tokens)
        await asyncio.sleep(0.05)  # each send fails
    assert caplog.text.count("sending quota charges to Redis failed") == 1
    down = False
    await q.charge_soon(first, 1)
    await asyncio.sleep(0.05)
    assert await q.used("key", "k", "tokens/day") == 5 + 6 + 7 + 1
    assert "reach Redis again" in caplog.text
    down = True
    await q.charge_soon(first, 9)
    await q.drain(timeout_s=1)  # does not raise
    assert "not sent to Redis: 9 tokens over 1 counters" in caplog.text
    assert await q.used("key", "k", "tokens/day") == 19
