"""The audit log on a real PostgreSQL (a throwaway cluster on loopback): the same chain,
tamper detection and retention as SQLite, and two instances writing one chain at once."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmhost.audit.store import PostgresAuditStore, open_store
from llmhost.errors import ConfigError
from tests.conftest import IN_CI, require
from tests.unit.test_audit import rec


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    return Path(exe).parent if exe else None


@pytest.fixture(scope="module")
def pg_url():
    bindir = _pg_bin()
    if bindir is None:
        if IN_CI:
            pytest.fail("PostgreSQL (initdb) is required in CI but missing")
        pytest.skip("PostgreSQL not installed")
    require("psycopg")
    # Not under pytest's temp root: that is private to us, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="llmhost-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        pw = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "llmhost"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-w",
            "-l",
            str(root / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                *run_as,
                str(bindir.parent / "bin" / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "llmhost",
                "audit",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://llmhost@127.0.0.1:{port}/audit"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _open(url: str, folder: Path, key: Path | None = None) -> PostgresAuditStore:
    """A store as one instance opens it: its own head checkpoint, the shared audit key."""
    folder.mkdir(exist_ok=True)
    store = open_store(
        url, Path("/nonexistent"), key_file=key or folder / "audit.key", head_file=folder / "head"
    )
    assert isinstance(store, PostgresAuditStore)
    return store


def _reset(url: str, folder: Path) -> PostgresAuditStore:
    store = _open(url, folder)
    store._execute("DELETE FROM audit")
    store._execute("DELETE FROM audit_meta")
    return store


def test_chain_search_tamper_and_purge(pg_url, tmp_path):
    store = _reset(pg_url, tmp_path / "a")
    store.append([rec(i, user="alice" if i % 2 else "bob") for i in range(10)])
    assert store.verify().ok and store.count() == 10
    assert [r.request_id for r in store.search(user="alice")] == ["r1", "r3", "r5", "r7", "r9"]
    store._execute("UPDATE audit SET prompt = 'changed' WHERE seq = 4")
    assert store.verify().problem == "record 4 was modified"
    store._execute("UPDATE audit SET prompt = 'prompt 3' WHERE seq = 4")
    store._execute("DELETE FROM audit WHERE seq > 8")  # the tail: the head checkpoint has it
    assert store.verify().problem.startswith("records 9-10 were removed from the end")
    store.close()
    store = _reset(pg_url, tmp_path / "b")
    now = 1_800_000_000.0
    store.append([rec(i, ts=now - (100 - i) * 86400) for i in range(20)])
    assert store.purge(90 * 86400, now=now) == 10
    assert store.verify().ok and store.verify().checked == 10
    # head records dropped and the anchor moved as a purge would, without the key
    row = store._execute("SELECT hash FROM audit WHERE seq = 12").fetchone()[0]
    store._execute("DELETE FROM audit WHERE seq <= 12")
    store._execute("UPDATE audit_meta SET value = '12' WHERE key = 'anchor_seq'")
    store._execute("UPDATE audit_meta SET value = %s WHERE key = 'anchor_hash'", (row,))
    assert "purge anchor (record 12) is not signed" in store.verify().problem
    store.close()


def test_two_instances_share_one_chain(pg_url, tmp_path):
    _reset(pg_url, tmp_path / "a").close()
    key = tmp_path / "a" / "audit.key"  # made by the first instance, copied to the others
    a, b = _open(pg_url, tmp_path / "a"), _open(pg_url, tmp_path / "b", key)
    errors = []

    def writer(store, base):
        try:
            for i in range(50):
                store.append([rec(base + i), rec(base + i + 1000)])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, n)) for s, n in ((a, 0), (b, 5000))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and time.monotonic() - t0 < 120
    assert a.count() == 200 and a.verify().ok and b.verify().checked == 200
    a.close()
    b.close()
    # each instance checks against its own head checkpoint
    assert _open(pg_url, tmp_path / "a").verify().ok
    assert _open(pg_url, tmp_path / "b", key).verify().ok
    # an instance with a key of its own refuses to write into the shared chain
    with pytest.raises(ConfigError, match="same key file"):
        open_store(
            pg_url,
            Path("/nonexistent"),
            key_file=tmp_path / "c.key",
            head_file=tmp_path / "c.head",
            writer=True,
        )
