"""Usage accounts in PostgreSQL (a throwaway cluster on loopback) where the audit log is
there: two instances adding to the same day's sums at once lose nothing, and a server with
`audit_url` set reports usage from it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import httpx

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore
from llmhost.security.usage import (
    PostgresUsageStore,
    UsageRecorder,
    UsageRow,
    UsageStore,
    open_usage_store,
)
from tests.integration.test_audit_postgres import pg_url  # noqa: F401 (a fixture)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


async def test_two_instances_add_to_one_account(pg_url, tmp_path):  # noqa: F811
    assert isinstance(open_usage_store(None, tmp_path / "u.db"), UsageStore)
    clock = lambda: ts("2026-03-04 05:06:07")  # noqa: E731
    a = UsageRecorder(open_usage_store(pg_url, tmp_path / "u.db"), clock=clock)
    b = UsageRecorder(PostgresUsageStore(pg_url), clock=clock)
    assert isinstance(a.store, PostgresUsageStore)

    async def add(recorder: UsageRecorder, n: int) -> None:
        for i in range(n):
            recorder.add("k1", "alice", "m", 2, 3)
            if i % 50 == 0:
                await recorder.flush()

    await asyncio.gather(add(a, 500), add(b, 700))
    await a.close()
    await b.close()
    rows = await asyncio.to_thread(a.store.query, "2026-03-01", "2026-03-31", "user", 10)
    assert rows == [UsageRow("alice", 1200, 2400, 3600)]
    b.add("k2", "bob", "m", 1, 1)
    b.add("k3", "carol", "m", 1000, 0)
    await b.flush()
    top = await asyncio.to_thread(a.store.report, "2026-03-01", "2026-03-31", "key", 2)
    assert [r.group for r in top.rows] == ["k1", "k3"]  # the largest token users first
    assert top.total == UsageRow("all", 1202, 3401, 3601) and top.groups == 3
    a.store.close()
    b.store.close()


async def test_a_server_reports_usage_from_postgres(pg_url, tmp_path):  # noqa: F811
    settings = Settings(home=tmp_path, audit=False, rate_limit_rps=0, audit_url=pg_url)
    keys = KeyStore(settings.keys_db)
    admin, _ = keys.create("pg-admin", "admin")
    keys.close()
    app = create_app(FakeEngine(script=["a"]), settings)
    h = {"Authorization": f"Bearer {admin}"}
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t", headers=h) as c:
            for _ in range(3):
                body = {"prompt": "one two", "max_tokens": 2}
                assert (await c.post("/v1/completions", json=body)).status_code == 200
            r = await c.get("/v1/admin/usage", params={"group_by": "user"})
    assert isinstance(app.state.usage.store, PostgresUsageStore)
    mine = [row for row in r.json()["data"] if row["user"] == "pg-admin"]
    assert mine == [
        {
            "user": "pg-admin",
            "requests": 3,
            "prompt_tokens": 6,
            "completion_tokens": 6,
            "total_tokens": 12,
        }
    ]
