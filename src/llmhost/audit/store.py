"""The audit log on disk: one row per request, each carrying the hash of the row before it, so
an edited, deleted or inserted record breaks the chain (`verify`). SQLite in WAL mode (the file
and its -wal/-shm 0600), or PostgreSQL shared by several instances.

A record's hash is HMAC-SHA256 under the audit key over the previous hash and the record's
fields (its sequence number included, so a deleted row shows even if someone re-links its
neighbours). The key lives outside the database (`$LLMHOST_HOME/audit.key`, made 0600 on first
use; instances sharing one PostgreSQL log must share its content; `audit_meta.key_id` names it,
so a store with another key refuses to write). Without the key nobody can recompute the chain.

Two things a chain alone cannot show are anchored outside it too:
- a purge removes the oldest records and records the hash of the last one removed (the anchor)
  in `audit_meta`, signed under the key, so head rows cannot be dropped by moving the anchor;
- after appends (at most every second, and always on close) and after each purge the store
  writes a signed head checkpoint (`$LLMHOST_HOME/audit.head`, 0600): the newest record's
  sequence number and hash, and the anchor. A removed tail, a rewritten record or a log put
  back from an older copy disagrees with it.

A log written before records were keyed (an older llmhost: no `scheme` in `audit_meta`) is
never taken as keyed: `verify` reports it, the server refuses to write to it, and
`llmhost audit seal` checks its unkeyed chain once, then signs its head (`legacy_*` in
`audit_meta`) so new records follow it under the key. Sealing is refused once a head checkpoint
exists: a keyed log rewritten in the old form is not a log to seal. Records up to the sealed
head are as safe as that signed head (a sha256 chain ending in it); records after it are keyed.
Stop instances of an older llmhost before the first keyed write to a shared PostgreSQL log."""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict, TypeVar

from typing_extensions import Unpack

from llmhost.audit import chain
from llmhost.audit.integrity import Checkpoint, HeadFile, key_id, same, sign
from llmhost.audit.records import (  # re-exported: the store's callers import them from here
    COLUMNS,
    FIELDS,
    GENESIS,
    chain_hash,
)
from llmhost.audit.records import AuditRecord as AuditRecord
from llmhost.audit.records import ChainReport as ChainReport
from llmhost.audit.records import StoredRecord as StoredRecord
from llmhost.errors import ConfigError, IntegrityError
from llmhost.files import load_or_create_key, private_sqlite

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
CREATE INDEX IF NOT EXISTS audit_model_ts ON audit (model, ts);
CREATE INDEX IF NOT EXISTS audit_status_ts ON audit (status, ts);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


T = TypeVar("T")


class Cursor(Protocol):
    """What the store uses of a DB-API cursor (sqlite3's, psycopg's); values come back as
    the driver decodes them."""

    def execute(self, sql: str, args: tuple[Any, ...], /) -> object: ...
    def executemany(self, sql: str, rows: list[tuple[Any, ...]], /) -> object: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    @property
    def rowcount(self) -> int: ...


class Connection(Protocol):
    """A DB-API connection in autocommit mode: the store begins and ends its transactions."""

    def cursor(self) -> Cursor: ...
    def close(self) -> None: ...


_UPSERT = (
    "INSERT INTO audit_meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class SearchFilters(TypedDict, total=False):
    """What `search` (and `search_sql`) filter and page by; every one optional."""

    user: str | None
    since: float | None
    until: float | None
    model: str | None
    status: int | None
    limit: int | None
    offset: int
    newest_first: bool


class SqlAuditStore:
    """The chain logic over any DB-API connection; subclasses give the dialect. Thread-safe
    (one connection behind a lock); the writer task calls it from a thread. Appends and purges
    run in a transaction that locks the table, so several instances may share one database."""

    ph = "?"  # parameter placeholder
    begin: tuple[str, ...] = ("BEGIN",)
    begin_read = "BEGIN"  # one snapshot for the anchor and the rows it starts

    def __init__(self, db: Connection, key_file: Path, head_file: Path) -> None:
        self._lock = threading.Lock()
        self._db = db
        self.key_file = Path(key_file)
        self.head_file = Path(head_file)
        self._head = HeadFile(self.head_file)
        self._key: bytes | None = None
        self._keyed = False  # this log's scheme and key id were checked

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        cur = self._db.cursor()
        cur.execute(self._q(sql), tuple(args))
        return cur

    def close(self) -> None:
        """Write the last head checkpoint, then close the database."""
        self._head.close()
        with self._lock:
            self._db.close()

    def key(self, *, create: bool = True) -> bytes:
        if self._key is None:
            self._key = load_or_create_key(self.key_file, create=create, what="audit key")
        return self._key

    def _meta(self, key: str, default: str) -> str:
        row = self._execute("SELECT value FROM audit_meta WHERE key = ?", (key,)).fetchone()
        value: str = row[0] if row else default
        return value

    def _meta_all(self) -> dict[str, str]:
        return dict(self._execute("SELECT key, value FROM audit_meta").fetchall())

    def _tail(self) -> tuple[int, str]:
        row = self._execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row:
            return row[0], row[1]
        return int(self._meta("anchor_seq", "0")), self._meta("anchor_hash", GENESIS)

    def _transaction(self, fn: Callable[[], T]) -> T:
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

    def _ensure_keyed(self) -> bytes:
        """Inside a write transaction: the key, after checking the log is one written under
        it; a new, empty log is marked keyed by this key."""
        key = self.key()
        if self._keyed:
            return key
        meta = self._meta_all()
        if "scheme" not in meta:
            empty = self._execute("SELECT count(*) FROM audit").fetchone()[0] == 0
            if not empty or "anchor_seq" in meta:
                raise IntegrityError(chain.LEGACY_MESSAGE, code="unkeyed_audit_log")
            if self.head_file.exists():
                raise IntegrityError(chain.gone_message(self.head_file), code="audit_log_replaced")
            self._execute(_UPSERT, ("scheme", chain.SCHEME))
            self._execute(_UPSERT, ("key_id", key_id(key)))
        elif meta["scheme"] != chain.SCHEME:
            raise IntegrityError(f"unknown audit log scheme {meta['scheme'][:40]!r}")
        elif not same(meta.get("key_id", ""), key_id(key)):
            raise ConfigError(
                f"the audit key {self.key_file} is not the key this audit log is written with; "
                "every instance sharing the log needs the same key file"
            )
        self._keyed = True
        return key

    def ready_for_writing(self) -> None:
        """Fail now, not on the first record, when this store could not write the log: no
        usable key, another key, or an unsealed log from an older llmhost."""
        self._transaction(self._ensure_keyed)

    def _checkpoint(self) -> Checkpoint:
        seq, h = self._tail()
        meta = self._meta_all()
        anchor = int(meta.get("anchor_seq", "0")), meta.get("anchor_hash", GENESIS)
        return Checkpoint(seq, h, *anchor)

    def append(self, records: Sequence[AuditRecord]) -> int:
        """Append in one transaction; returns the last sequence number."""

        def run() -> tuple[int, Checkpoint]:
            key = self._ensure_keyed()
            seq, prev = self._tail()
            rows = []
            for rec in records:
                seq += 1
                h = chain_hash(prev, seq, rec, key=key)
                rows.append((seq, *(getattr(rec, k) for k in FIELDS), prev, h))
                prev = h
            marks = ",".join([self.ph] * len(COLUMNS))
            self._db.cursor().executemany(
                f"INSERT INTO audit ({','.join(COLUMNS)}) VALUES ({marks})", rows
            )
            return seq, self._checkpoint()

        seq, cp = self._transaction(run)
        self._head.offer(self.key(), cp)
        return seq

    def _rows(self, sql: str, args: Sequence[object]) -> Iterator[StoredRecord]:
        with self._lock:
            rows = self._execute(sql, args).fetchall()
        for row in rows:
            yield StoredRecord(**dict(zip(COLUMNS, row, strict=True)))

    def search_sql(
        self,
        *,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        status: int | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> tuple[str, list[object]]:
        """The query `search` runs, and its arguments."""
        where: list[str] = []
        args: list[object] = []
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
        sql = f"SELECT {','.join(COLUMNS)} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Newest first is by time (then sequence): each filter's index ends in ts (user_id,
        # model, status, or ts alone), so a page of any filter, a time range of any width
        # included, is read in order from an index, never sorted from all its matches.
        sql += " ORDER BY ts DESC, seq DESC" if newest_first else " ORDER BY seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
            if offset:
                sql += f" OFFSET {int(offset)}"
        return sql, args

    def search(self, **filters: Unpack[SearchFilters]) -> list[StoredRecord]:
        """The records matching every filter given, oldest first (by sequence number), or
        newest first if asked (by time, then sequence number), at most `limit` of them after
        skipping `offset` (a page of a long result; `offset` applies with a `limit` only)."""
        return list(self._rows(*self.search_sql(**filters)))

    def count(self) -> int:
        with self._lock:
            n: int = self._execute("SELECT count(*) FROM audit").fetchone()[0]
        return n

    def verify(self) -> ChainReport:
        """The chain checked under the audit key, from the signed purge anchor to the newest
        record, then against the signed head checkpoint (audit/chain.py)."""
        # the checkpoint first: it is written after the records it names are committed, so
        # records appended while this runs can only be newer than it
        try:
            raw_cp = Checkpoint.read(self.head_file)
        except IntegrityError as exc:
            return ChainReport(False, 0, exc.message)
        with self._lock:
            self._execute(self.begin_read)
            try:
                meta = self._meta_all()
                rows = self._execute(
                    f"SELECT {','.join(COLUMNS)} FROM audit ORDER BY seq"
                ).fetchall()
            finally:
                self._execute("COMMIT")
        key = functools.partial(self.key, create=False)
        return chain.check(meta, rows, raw_cp, key, self.key_file, self.head_file)

    def purge(self, older_than_s: float, now: float | None = None) -> int:
        """Remove records older than the retention, oldest first; the chain stays verifiable
        from the last removed record's hash, signed as the new anchor."""
        cutoff = (now if now is not None else time.time()) - older_than_s

        def run() -> tuple[int, Checkpoint | None]:
            key = self._ensure_keyed()
            last = self._execute("SELECT max(seq) FROM audit WHERE ts < ?", (cutoff,)).fetchone()[0]
            if last is None:
                return 0, None
            anchor = self._execute("SELECT hash FROM audit WHERE seq = ?", (last,)).fetchone()[0]
            n = self._execute("DELETE FROM audit WHERE seq <= ?", (last,)).rowcount
            self._execute(_UPSERT, ("anchor_seq", str(last)))
            self._execute(_UPSERT, ("anchor_hash", anchor))
            self._execute(_UPSERT, ("anchor_mac", sign(key, "anchor", last, anchor)))
            return n, self._checkpoint()

        n, cp = self._transaction(run)
        if cp is not None:
            self._head.offer(self.key(), cp, now=True)
        return n

    def seal(self) -> ChainReport:
        """Take a log written before records were keyed under the audit key: check its unkeyed
        chain, then sign its head and its purge anchor; later records are keyed."""
        if self.head_file.exists():
            raise IntegrityError(
                f"a head checkpoint exists ({self.head_file}), so this log was written under "
                "the audit key before: it has been rewritten in the old form; not sealing it"
            )
        key = self.key()

        def run() -> tuple[ChainReport, Checkpoint]:
            meta = self._meta_all()
            if "scheme" in meta:
                raise IntegrityError("the audit log is already written under the audit key")
            a_seq = int(meta.get("anchor_seq", "0"))
            a_hash = meta.get("anchor_hash", GENESIS)
            rows = self._execute(f"SELECT {','.join(COLUMNS)} FROM audit ORDER BY seq").fetchall()
            report, last, last_hash = chain.walk(rows, a_hash, a_seq + 1, lambda _: None, None)
            if not report.ok:
                raise IntegrityError(
                    f"not sealing: the older audit chain is broken after {report.checked} "
                    f"records: {report.problem}"
                )
            if not rows:
                last, last_hash = a_seq, a_hash
            for k, v in (
                ("scheme", chain.SCHEME),
                ("key_id", key_id(key)),
                ("legacy_seq", str(last)),
                ("legacy_hash", last_hash),
                ("legacy_mac", sign(key, "legacy", last, last_hash)),
                ("anchor_mac", sign(key, "anchor", a_seq, a_hash)),
            ):
                self._execute(_UPSERT, (k, v))
            return report, Checkpoint(last, last_hash, a_seq, a_hash)

        report, cp = self._transaction(run)
        self._keyed = True
        self._head.offer(key, cp, now=True)
        return report


class SqliteAuditStore(SqlAuditStore):
    """The default: `$LLMHOST_HOME/audit.db`, WAL mode, owner-only."""

    begin = ("BEGIN IMMEDIATE",)

    def __init__(
        self,
        path: Path | str,
        *,
        key_file: Path | None = None,
        head_file: Path | None = None,
    ):
        self.path = Path(path)
        # SQLite gives -wal and -shm the database file's mode, so a 0600 file keeps all three
        # private whatever the umask
        private_sqlite(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA.format(int="INTEGER", real="REAL"))
        super().__init__(
            db,
            key_file or self.path.with_name("audit.key"),
            head_file or self.path.with_suffix(".head"),
        )


class PostgresAuditStore(SqlAuditStore):
    """A shared log for several instances (`LLMHOST_AUDIT_URL=postgresql://...`); each keeps
    its own head checkpoint, all use the same audit key."""

    ph = "%s"
    begin = ("BEGIN", "LOCK TABLE audit IN SHARE ROW EXCLUSIVE MODE")
    begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ"

    def __init__(self, url: str, *, key_file: Path, head_file: Path):
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
        super().__init__(db, key_file, head_file)


def open_store(
    url: str | None,
    sqlite_path: Path,
    *,
    key_file: Path | None = None,
    head_file: Path | None = None,
    writer: bool = False,
) -> SqlAuditStore:
    """PostgreSQL when a URL is configured, else the SQLite file. The key and the head
    checkpoint default to `audit.key` and `<db>.head` beside the SQLite file. `writer` checks
    now that records can be written (key, scheme), so a server fails at start, not per batch."""
    key_file = key_file or sqlite_path.with_name("audit.key")
    head_file = head_file or sqlite_path.with_suffix(".head")
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("the audit URL must be postgresql://user:pass@host/db")
        store: SqlAuditStore = PostgresAuditStore(url, key_file=key_file, head_file=head_file)
    else:
        store = SqliteAuditStore(sqlite_path, key_file=key_file, head_file=head_file)
    if writer:
        try:
            store.ready_for_writing()
        except BaseException:
            store.close()
            raise
    return store
