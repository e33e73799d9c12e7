"""The audit log on disk: one row per request, each carrying the hash of the row before it, so
an edited, deleted or inserted record breaks the chain (`verify`). SQLite in WAL mode; a purge
keeps the chain verifiable by recording the hash of the last record it removed (the anchor).

A record's hash is sha256 over the previous hash and the record's fields (its sequence number
included, so a deleted row shows even if someone re-links its neighbours)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from llmhost.errors import ConfigError

GENESIS = "0" * 64


@dataclass
class AuditRecord:
    """The guide's fields (timestamp, client IP, user id, prompt, response length, latency)
    plus request id, model, route, status and token counts."""

    ts: float
    request_id: str
    client_ip: str
    user_id: str
    route: str
    status: int
    model: str = ""
    prompt: str | None = None  # as the prompt mode stores it: redacted, full, hash or none
    response_length: int = 0  # characters of generated text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0

    def line(self) -> str:
        """The guide's layout:
        [TIMESTAMP] [CLIENT_IP] [USER_ID] [PROMPT] [RESPONSE_LENGTH] [LATENCY]"""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts))
        stamp += f".{int(self.ts % 1 * 1000):03d}Z"
        prompt = json.dumps(self.prompt if self.prompt is not None else "", ensure_ascii=False)
        return (
            f"[{stamp}] [{self.client_ip}] [{self.user_id}] [{prompt}] "
            f"[{self.response_length}] [{self.latency_ms:.0f}ms]"
        )


FIELDS = [f.name for f in fields(AuditRecord)]


@dataclass
class StoredRecord(AuditRecord):
    seq: int = 0
    prev_hash: str = GENESIS
    hash: str = ""


def chain_hash(prev: str, seq: int, rec: AuditRecord) -> str:
    body = {k: getattr(rec, k) for k in FIELDS}
    body["ts"] = repr(float(rec.ts))
    body["latency_ms"] = repr(float(rec.latency_ms))
    payload = json.dumps([prev, seq, body], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ChainReport:
    ok: bool
    checked: int
    problem: str | None = None
    seq: int | None = None


_COLUMNS = ["seq", *FIELDS, "prev_hash", "hash"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq {int} PRIMARY KEY,
    ts {real} NOT NULL,
    request_id TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    user_id TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT,
    response_length INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms {real} NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_user_ts ON audit (user_id, ts);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SqlAuditStore:
    """The chain logic over any DB-API connection; subclasses give the dialect. Thread-safe
    (one connection behind a lock); the writer task calls it from a thread. Appends and purges
    run in a transaction that locks the table, so several instances may share one database."""

    ph = "?"  # parameter placeholder
    begin: tuple[str, ...] = ("BEGIN",)

    def __init__(self, db) -> None:
        self._lock = threading.Lock()
        self._db = db

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def _execute(self, sql: str, args: Sequence = ()):
        cur = self._db.cursor()
        cur.execute(self._q(sql), tuple(args))
        return cur

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str, default: str) -> str:
        row = self._execute("SELECT value FROM audit_meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _tail(self) -> tuple[int, str]:
        row = self._execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row:
            return row[0], row[1]
        return int(self._meta("anchor_seq", "0")), self._meta("anchor_hash", GENESIS)

    def _transaction(self, fn):
        with self._lock:
            for stmt in self.begin:
                self._execute(stmt)
            try:
                out = fn()
                self._execute("COMMIT")
            except BaseException:
                self._execute("ROLLBACK")
                raise
            return out

    def append(self, records: Sequence[AuditRecord]) -> int:
        """Append in one transaction; returns the last sequence number."""

        def run() -> int:
            seq, prev = self._tail()
            rows = []
            for rec in records:
                seq += 1
                h = chain_hash(prev, seq, rec)
                rows.append((seq, *(getattr(rec, k) for k in FIELDS), prev, h))
                prev = h
            marks = ",".join([self.ph] * len(_COLUMNS))
            self._db.cursor().executemany(
                f"INSERT INTO audit ({','.join(_COLUMNS)}) VALUES ({marks})", rows
            )
            return seq

        return self._transaction(run)

    def _rows(self, sql: str, args: Sequence) -> Iterator[StoredRecord]:
        with self._lock:
            rows = self._execute(sql, args).fetchall()
        for row in rows:
            yield StoredRecord(**dict(zip(_COLUMNS, row, strict=True)))

    def search(
        self,
        *,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        status: int | None = None,
        limit: int | None = None,
    ) -> list[StoredRecord]:
        where, args = [], []
        for col, op, val in (
            ("user_id", "=", user),
            ("ts", ">=", since),
            ("ts", "<", until),
            ("model", "=", model),
            ("status", "=", status),
        ):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        sql = f"SELECT {','.join(_COLUMNS)} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return list(self._rows(sql, args))

    def count(self) -> int:
        with self._lock:
            return self._execute("SELECT count(*) FROM audit").fetchone()[0]

    def verify(self) -> ChainReport:
        with self._lock:
            prev = self._meta("anchor_hash", GENESIS)
            expect = int(self._meta("anchor_seq", "0")) + 1
            rows = self._execute(f"SELECT {','.join(_COLUMNS)} FROM audit ORDER BY seq").fetchall()
        checked = 0
        for row in rows:
            rec = StoredRecord(**dict(zip(_COLUMNS, row, strict=True)))
            if rec.seq != expect:
                return ChainReport(False, checked, f"record {expect} is missing", expect)
            if rec.prev_hash != prev:
                problem = f"record {rec.seq} does not follow its predecessor"
                return ChainReport(False, checked, problem, rec.seq)
            base = AuditRecord(**{k: getattr(rec, k) for k in FIELDS})
            if chain_hash(prev, rec.seq, base) != rec.hash:
                return ChainReport(False, checked, f"record {rec.seq} was modified", rec.seq)
            prev, expect = rec.hash, expect + 1
            checked += 1
        return ChainReport(True, checked)

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Remove records older than the retention, oldest first; the chain stays verifiable
        from the last removed record's hash."""
        cutoff = (now if now is not None else time.time()) - older_than_s

        def run() -> int:
            last = self._execute("SELECT max(seq) FROM audit WHERE ts < ?", (cutoff,)).fetchone()[0]
            if last is None:
                return 0
            anchor = self._execute("SELECT hash FROM audit WHERE seq = ?", (last,)).fetchone()[0]
            n = self._execute("DELETE FROM audit WHERE seq <= ?", (last,)).rowcount
            upsert = (
                "INSERT INTO audit_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )
            self._execute(upsert, ("anchor_seq", str(last)))
            self._execute(upsert, ("anchor_hash", anchor))
            return n

        return self._transaction(run)


class SqliteAuditStore(SqlAuditStore):
    """The default: `$LLMHOST_HOME/audit.db`, WAL mode."""

    begin = ("BEGIN IMMEDIATE",)

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA.format(int="INTEGER", real="REAL"))
        super().__init__(db)


class PostgresAuditStore(SqlAuditStore):
    """A shared log for several instances (`LLMHOST_AUDIT_URL=postgresql://...`)."""

    ph = "%s"
    begin = ("BEGIN", "LOCK TABLE audit IN SHARE ROW EXCLUSIVE MODE")

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError(
                "a PostgreSQL audit log needs: pip install 'llmhost[postgres]'"
            ) from exc
        try:
            db = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to the audit database: {exc}") from exc
        self.url = url
        with db.cursor() as cur:
            for stmt in _SCHEMA.format(int="BIGINT", real="DOUBLE PRECISION").split(";"):
                if stmt.strip():
                    cur.execute(stmt)
        super().__init__(db)


def open_store(url: str | None, sqlite_path: Path) -> SqlAuditStore:
    """PostgreSQL when a URL is configured, else the SQLite file."""
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("the audit URL must be postgresql://user:pass@host/db")
        return PostgresAuditStore(url)
    return SqliteAuditStore(sqlite_path)


def as_dict(rec: StoredRecord) -> dict:
    return asdict(rec)
