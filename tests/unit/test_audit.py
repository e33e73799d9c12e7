"""The audit log: chain verification against edits, deletions and insertions, search, purge
with retention, the writer draining on close, and records from the API (fake engine)."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import pytest

from llmhost.api import create_app
from llmhost.api.audit import stored_prompt
from llmhost.audit.store import AuditRecord, SqliteAuditStore
from llmhost.audit.writer import AuditWriter
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore
from llmhost.security.redact import Redactor

DAY = 86400


def rec(i: int, user: str = "alice", ts: float | None = None, status: int = 200) -> AuditRecord:
    return AuditRecord(
        ts=ts if ts is not None else 1_700_000_000 + i,
        request_id=f"r{i}",
        client_ip="127.0.0.1",
        user_id=user,
        route="/v1/completions",
        status=status,
        model="m",
        prompt=f"prompt {i}",
        response_length=10 + i,
        prompt_tokens=3,
        completion_tokens=5,
        latency_ms=12.5,
    )


@pytest.fixture()
def store(tmp_path) -> SqliteAuditStore:
    s = SqliteAuditStore(tmp_path / "audit.db")
    s.append([rec(i, user="alice" if i % 2 else "bob") for i in range(10)])
    yield s
    s.close()


def raw(store: SqliteAuditStore, sql: str, *args) -> None:
    db = sqlite3.connect(store.path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_chain_verifies_and_search_filters(store):
    assert store.verify().ok and store.verify().checked == 10
    alice = store.search(user="alice")
    assert [r.request_id for r in alice] == ["r1", "r3", "r5", "r7", "r9"]
    assert [r.seq for r in store.search(since=1_700_000_005, until=1_700_000_007)] == [6, 7]
    assert store.search(status=500) == []
    line = alice[0].line()
    assert line.startswith('[2023-11-14T22:13:21.000Z] [127.0.0.1] [alice] ["prompt 1"] [11]')


@pytest.mark.parametrize(
    "tamper, problem",
    [
        ("UPDATE audit SET prompt = 'changed' WHERE seq = 4", "record 4 was modified"),
        ("UPDATE audit SET user_id = 'mallory' WHERE seq = 10", "record 10 was modified"),
        ("DELETE FROM audit WHERE seq = 5", "record 5 is missing"),
        ("DELETE FROM audit WHERE seq = 10", None),  # the tail: caught by count, see below
    ],
)
def test_edits_and_deletions_break_the_chain(store, tamper, problem):
    raw(store, tamper)
    report = store.verify()
    if problem is None:
        assert report.ok and report.checked == 9  # dropping the newest record leaves a valid
        return  # prefix; the writer's sequence numbers keep counting, see the insertion test
    assert not report.ok and report.problem == problem


def test_inserted_record_breaks_the_chain(store):
    raw(
        store,
        "INSERT INTO audit VALUES (11, 1, 'x', '1.2.3.4', 'eve', '/', 200, 'm', 'p', 1, 1, 1, 1,"
        " ?, ?)",
        "0" * 64,
        "f" * 64,
    )
    report = store.verify()
    assert not report.ok and "11" in report.problem


def test_purge_keeps_retention_and_chain(tmp_path):
    s = SqliteAuditStore(tmp_path / "a.db")
    now = 1_800_000_000.0
    s.append([rec(i, ts=now - (100 - i) * DAY) for i in range(20)])  # 100..81 days old
    s.append([rec(100 + i, ts=now - (5 - i) * DAY) for i in range(5)])  # 5..1 days old
    assert s.purge(90 * DAY, now=now) == 10  # 100..91 days old
    assert s.count() == 15 and min(r.ts for r in s.search()) >= now - 90 * DAY
    assert s.verify().ok and s.verify().checked == 15
    s.append([rec(999, ts=now)])
    assert s.verify().ok
    assert s.purge(90 * DAY, now=now) == 0


async def test_writer_drains_everything_on_close(tmp_path):
    s = SqliteAuditStore(tmp_path / "w.db")
    w = AuditWriter(s)
    w.start()
    for i in range(2500):
        w.submit(rec(i))
    await w.close()
    assert s.count() == 2500 and s.verify().ok


def test_prompt_modes():
    r = Redactor()
    text = "my mail is a@b.io"
    assert stored_prompt(text, "redacted", r) == "my mail is [EMAIL]"
    assert stored_prompt(text, "full", r) == text
    assert stored_prompt(text, "hash", r).startswith("sha256:")
    assert stored_prompt(text, "none", r) is None


async def test_api_writes_one_record_per_generation(tmp_path):
    settings = Settings(home=tmp_path, audit_prompt_mode="redacted")
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create("alice")
    keys.close()
    engine = FakeEngine(script=["Hel", "lo", "!"])
    app = create_app(engine, settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=auth) as c:
            r = await c.post(
                "/v1/completions",
                json={"prompt": "write to bob@example.com", "max_tokens": 3},
            )
            assert r.status_code == 200
            r = await c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "max_tokens": 3,
                },
            )
            assert r.status_code == 200
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
            assert r.status_code in (400, 422)
            assert (await c.get("/health")).status_code == 200  # not audited
            r = await c.post("/generate", json={"prompt": "x"}, headers={"Authorization": ""})
            assert r.status_code == 401
    store = SqliteAuditStore(tmp_path / "audit.db")
    found = store.search()
    assert [(r.route, r.status, r.user_id) for r in found] == [
        ("/v1/completions", 200, "alice"),
        ("/v1/chat/completions", 200, "alice"),
        ("/v1/completions", found[2].status, "alice"),
        ("/generate", 401, "anonymous"),  # refused callers are on record too
    ]
    first = found[0]
    assert first.prompt == "write to [EMAIL]" and first.client_ip == "10.1.2.3"
    assert first.response_length == len("Hello!")
    assert first.completion_tokens == 3 and first.latency_ms > 0
    assert found[1].response_length == len("Hello!") and found[1].completion_tokens == 3
    assert found[2].status >= 400
    assert store.verify().ok
