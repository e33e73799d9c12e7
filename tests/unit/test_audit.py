"""The audit log: chain verification against edits, deletions and insertions, a keyed chain
that cannot be recomputed, the signed head checkpoint and purge anchor against truncation and
rollback, older unkeyed logs, owner-only files, search, purge with retention, the writer
draining on close, and records from the API (fake engine)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time

import httpx
import pytest

from llmhost.api import create_app
from llmhost.api.audit import stored_prompt
from llmhost.audit.integrity import Checkpoint, HeadFile
from llmhost.audit.store import (
    FIELDS,
    GENESIS,
    AuditRecord,
    SqliteAuditStore,
    chain_hash,
    open_store,
)
from llmhost.audit.writer import AuditWriter
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.errors import ConfigError, IntegrityError
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
        # the tail leaves a valid prefix: the signed head checkpoint is what catches it
        ("DELETE FROM audit WHERE seq = 10", "record 10 was removed from the end of the log"),
        ("DELETE FROM audit WHERE seq >= 8", "records 8-10 were removed from the end of the log"),
    ],
)
def test_edits_and_deletions_break_the_chain(store, tamper, problem):
    raw(store, tamper)
    report = store.verify()
    assert not report.ok and report.problem.startswith(problem)


def rechain(path, key: bytes | None, edit=None, start: int = 1) -> None:
    """What an attacker who can write the database does: change records, then recompute every
    hash from `start` on with the public chain_hash (`key=None`: the unkeyed sha256)."""
    db = sqlite3.connect(path)
    cols = ["seq", *FIELDS]
    rows = db.execute(f"SELECT {','.join(cols)} FROM audit ORDER BY seq").fetchall()
    prev = GENESIS
    for row in rows:
        values = dict(zip(cols, row, strict=True))
        seq = values.pop("seq")
        rec = AuditRecord(**values)
        if seq < start:
            prev = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
            continue
        if edit is not None:
            edit(seq, rec)
        h = chain_hash(prev, seq, rec, key=key)
        sets = ", ".join(f"{k} = ?" for k in FIELDS)
        db.execute(
            f"UPDATE audit SET {sets}, prev_hash = ?, hash = ? WHERE seq = ?",
            (*(getattr(rec, k) for k in FIELDS), prev, h, seq),
        )
        prev = h
    db.commit()
    db.close()


def test_key_and_checkpoint_are_private_files_outside_the_database(store, tmp_path):
    key = tmp_path / "audit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    head = tmp_path / "audit.head"
    assert stat.S_IMODE(head.stat().st_mode) == 0o600
    cp = Checkpoint.load(head, store.key())
    assert (cp.seq, cp.hash) == (10, store.search()[-1].hash)
    assert (cp.anchor_seq, cp.anchor_hash) == (0, GENESIS)


def mallory(seq: int, rec: AuditRecord) -> None:
    if seq == 4:
        rec.user_id = "mallory"


@pytest.mark.parametrize("attacker_key", [None, b"k" * 32], ids=["unkeyed", "another-key"])
def test_a_recomputed_chain_does_not_verify(store, attacker_key):
    rechain(store.path, attacker_key, mallory)
    report = store.verify()
    assert not report.ok and report.problem.startswith("record 1 was modified")
    assert "is not the key it was written with" in report.problem  # the hint for a wrong key


def test_checkpoint_forged_or_missing(store, tmp_path):
    head = tmp_path / "audit.head"
    good = head.read_bytes()
    raw(store, "DELETE FROM audit WHERE seq > 7")
    forged = json.loads(good)
    forged["seq"], forged["hash"] = 7, store.search()[-1].hash
    head.write_text(json.dumps(forged))  # the old signature no longer fits
    report = store.verify()
    assert not report.ok and "not signed by the audit key" in report.problem
    other = Checkpoint(7, forged["hash"], 0, GENESIS).dump(b"x" * 32)  # signed, by another key
    head.write_bytes(other)
    assert "not signed by the audit key" in store.verify().problem
    head.write_bytes(b"\x00" * 10)
    assert "unreadable" in store.verify().problem
    head.unlink()
    report = store.verify()
    assert not report.ok and report.problem.startswith("no head checkpoint")


def test_checkpoint_catches_a_rewritten_tail(store):
    rechain(store.path, store.key(), mallory)  # only with the key itself (a stolen key)...
    assert (
        store.verify().problem
        == "record 10 differs from the head checkpoint: the log was rewritten"
    )


def test_purge_anchor_is_signed_and_cannot_move_back(tmp_path):
    s = SqliteAuditStore(tmp_path / "a.db")
    now = 1_800_000_000.0
    s.append([rec(i, ts=now - (100 - i) * DAY) for i in range(20)])
    s.append([rec(100 + i, ts=now - (5 - i) * DAY) for i in range(5)])
    older = tmp_path / "older.db"
    raw(s, "PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(s.path, older)  # a copy from before the purge (WAL checkpointed below)
    assert s.purge(90 * DAY, now=now) == 10
    assert s.verify().ok
    # dropping more of the oldest records and moving the anchor like a purge would
    hash15 = s.search()[4].hash
    assert s.search()[4].seq == 15
    raw(s, "DELETE FROM audit WHERE seq <= 15")
    raw(s, "UPDATE audit_meta SET value = '15' WHERE key = 'anchor_seq'")
    raw(s, "UPDATE audit_meta SET value = ? WHERE key = 'anchor_hash'", hash15)
    report = s.verify()
    assert not report.ok and "purge anchor (record 15) is not signed" in report.problem
    s.close()
    # the whole log put back from before the purge: every row chains, the anchor moved back
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"a.db{suffix}").unlink(missing_ok=True)
    shutil.copy(older, tmp_path / "a.db")
    s = SqliteAuditStore(tmp_path / "a.db")
    report = s.verify()
    assert not report.ok and "replaced by another copy" in report.problem
    s.close()


def test_a_deleted_log_is_not_taken_for_a_new_one(store, tmp_path):
    store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"audit.db{suffix}").unlink(missing_ok=True)
    s = SqliteAuditStore(tmp_path / "audit.db")
    report = s.verify()
    assert not report.ok and "was deleted or replaced" in report.problem
    with pytest.raises(IntegrityError, match="deleted or replaced"):
        s.append([rec(1)])  # nor does a server start a new log over its checkpoint
    s.close()


def test_a_store_with_another_key_refuses_the_log(store, tmp_path):
    (tmp_path / "other").mkdir()
    other = SqliteAuditStore(store.path, key_file=tmp_path / "other" / "audit.key")
    with pytest.raises(ConfigError, match="not the key this audit log is written with"):
        other.append([rec(99)])
    assert not other.verify().ok
    with pytest.raises(ConfigError):
        open_store(None, store.path, key_file=tmp_path / "other" / "audit.key", writer=True)
    other.close()
    assert store.count() == 10 and store.verify().ok


def legacy_log(path) -> SqliteAuditStore:
    """A log as an older llmhost wrote it: an unkeyed chain, nothing in audit_meta."""
    s = SqliteAuditStore(path)
    db = sqlite3.connect(path)
    prev = GENESIS
    for seq in range(1, 6):
        r = rec(seq)
        h = chain_hash(prev, seq, r, key=None)
        marks = ",".join("?" * (len(FIELDS) + 3))
        db.execute(
            f"INSERT INTO audit (seq, {','.join(FIELDS)}, prev_hash, hash) VALUES ({marks})",
            (seq, *(getattr(r, k) for k in FIELDS), prev, h),
        )
        prev = h
    db.commit()
    db.close()
    return s


def test_an_older_unkeyed_log_is_reported_until_sealed(tmp_path):
    s = legacy_log(tmp_path / "audit.db")
    report = s.verify()
    assert not report.ok and "without the audit key" in report.problem
    with pytest.raises(IntegrityError, match="llmhost audit seal"):
        s.append([rec(6)])
    with pytest.raises(IntegrityError, match="llmhost audit seal"):
        open_store(None, s.path, writer=True)
    assert s.seal().checked == 5
    with pytest.raises(IntegrityError):
        s.seal()
    s.append([rec(6), rec(7)])
    assert s.verify().ok and s.verify().checked == 7
    # the older records are held by the signed head: recomputing them does not pass
    rechain(s.path, None, lambda seq, r: setattr(r, "prompt", "x") if seq == 2 else None, start=1)
    rechain(s.path, s.key(), start=6)  # even with the key for the newer ones
    assert "differs from the sealed head" in s.verify().problem
    s.close()


def test_a_keyed_log_rewritten_in_the_old_form_is_not_sealed(store):
    rechain(store.path, None, mallory)
    raw(store, "DELETE FROM audit_meta")
    report = store.verify()
    assert not report.ok and "without the audit key" in report.problem
    with pytest.raises(IntegrityError, match="head checkpoint exists"):
        store.seal()


def test_verify_while_a_server_writes_and_purges_finds_nothing_wrong(tmp_path):
    """`llmhost audit verify` runs beside a live server: records and checkpoints written
    meanwhile must not read as a removed tail, nor a purge as a missing record."""
    import threading

    w = SqliteAuditStore(tmp_path / "audit.db")
    w._head.every = 0.0  # a checkpoint after every batch: the most chances to race
    w.append([rec(i, ts=1.0) for i in range(20)])
    done = threading.Event()

    def serve():
        for i in range(150):
            w.append([rec(1000 + i, ts=1.0 + i)])
            if i % 50 == 49:
                w.purge(0, now=2.0 + i)
        done.set()

    t = threading.Thread(target=serve)
    t.start()
    cli = SqliteAuditStore(tmp_path / "audit.db")
    reports = []
    while not done.is_set():
        reports.append(cli.verify())
    t.join()
    reports.append(cli.verify())
    assert all(r.ok for r in reports), next(r for r in reports if not r.ok)
    assert len(reports) > 1
    cli.close()
    w.close()


def test_head_file_is_rate_limited_and_written_last(tmp_path):
    key = b"k" * 32
    slow = HeadFile(tmp_path / "slow.head", every=60)
    slow.offer(key, Checkpoint(1, "a", 0, GENESIS))
    slow.offer(key, Checkpoint(2, "b", 0, GENESIS))
    assert Checkpoint.load(slow.path, key).seq == 1
    slow.close()
    assert Checkpoint.load(slow.path, key).seq == 2
    quick = HeadFile(tmp_path / "quick.head", every=0.2)
    quick.offer(key, Checkpoint(1, "a", 0, GENESIS))
    quick.offer(key, Checkpoint(2, "b", 0, GENESIS))
    deadline = time.monotonic() + 10
    while Checkpoint.load(quick.path, key).seq != 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # a timer writes the last one without waiting for close
    assert Checkpoint.load(quick.path, key).seq == 2
    quick.close()


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_audit_files_are_owner_only_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        home = tmp_path / "home"
        s = SqliteAuditStore(home / "audit.db")
        s.append([rec(1)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("audit.db", "audit.db-wal", "audit.db-shm", "audit.key", "audit.head"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    s.close()


def test_cli_verify_reports_a_removed_tail(store, tmp_path):
    def verify():
        return subprocess.run(
            [sys.executable, "-m", "llmhost", "audit", "verify"],
            env={**os.environ, "LLMHOST_HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert verify().returncode == 0
    raw(store, "DELETE FROM audit WHERE seq > 8")
    p = verify()
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "records 9-10 were removed from the end of the log" in " ".join(p.stderr.split())


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
    s.close()  # the server closes the store after the writer: the last checkpoint is written
    s = SqliteAuditStore(tmp_path / "w.db")
    assert s.count() == 2500 and s.verify().ok
    assert Checkpoint.load(tmp_path / "w.head", s.key()).seq == 2500
    s.close()


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


def test_search_filters_use_an_index_newest_first_and_an_older_log_gains_them(tmp_path):
    path = tmp_path / "audit.db"
    s = SqliteAuditStore(path)
    recs = [rec(i, user=f"u{i % 3}", status=500 if i % 7 == 0 else 200) for i in range(40)]
    recs[20].ts = recs[25].ts  # records of the same second: newest first by sequence
    s.append(recs)
    s.close()
    # the log as an older llmhost left it: without the model and status indexes
    db = sqlite3.connect(path)
    for name in ("audit_model_ts", "audit_status_ts"):
        db.execute(f"DROP INDEX {name}")
    db.commit()
    db.close()
    s = SqliteAuditStore(path)  # opening it adds them in place
    try:
        assert s.verify().ok and s.verify().checked == 40
        db = sqlite3.connect(path)
        t0 = 1_700_000_000
        for filters, index in (
            ({}, "audit_ts"),
            ({"user": "u1"}, "audit_user_ts"),
            ({"model": "m"}, "audit_model_ts"),
            ({"status": 500}, "audit_status_ts"),
            ({"since": t0, "until": t0 + 30}, "audit_ts"),
            ({"model": "m", "since": t0, "until": t0 + 30}, "audit_model_ts"),
        ):
            sql, args = s.search_sql(**filters, limit=51, offset=50, newest_first=True)
            plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert f"INDEX {index}" in plan, (filters, plan)
            assert "TEMP B-TREE" not in plan, (filters, plan)  # read in order, never sorted
        db.close()
        page = s.search(user="u1", status=500, limit=2, offset=1, newest_first=True)
        want = [i + 1 for i in reversed(range(40)) if i % 3 == 1 and i % 7 == 0]
        assert [r.seq for r in page] == want[1:3]
        newest = [r.seq for r in s.search(since=t0 + 20, until=t0 + 27, newest_first=True)]
        assert newest == [27, 26, 21, 25, 24, 23, 22]  # by time, then sequence
        s.append([rec(40, user="u1")])  # and it goes on writing the chain
        assert s.verify().ok and s.verify().checked == 41
    finally:
        s.close()
