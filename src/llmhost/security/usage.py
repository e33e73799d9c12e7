"""Usage accounting: requests and tokens per API key, user and model per UTC day, added up as
requests finish (never by reading the audit log back). The request path only adds to a dict
in memory; a background task writes the sums to `$LLMHOST_HOME/usage.db` (SQLite, 0600) in a
thread about once a second, one transaction per batch, and the last batch on shutdown. Where
the audit log is in PostgreSQL, the sums are too, so several instances keep one account."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from llmhost.errors import ConfigError, InvalidRequest
from llmhost.files import private_sqlite

log = logging.getLogger("llmhost.usage")
GroupBy = Literal["key", "user", "model", "day"]
MAX_DAYS = 366
MAX_PENDING = 50_000  # distinct (day, key, user, model) rows held before an early write
MAX_HELD = 4 * MAX_PENDING  # rows kept while the store cannot be written, memory bounded
_COLUMNS: dict[str, str] = {"key": "key_id", "user": "user_id", "model": "model", "day": "day"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_daily (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (day, key_id, user_id, model)
)
"""
_ADD = (
    "INSERT INTO usage_daily VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, key_id, user_id, model) DO UPDATE SET "
    "requests = usage_daily.requests + excluded.requests, "
    "prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens"
)
Row = tuple[str, str, str, str]  # day, key id ("" for none), user, model


@dataclass(frozen=True)
class UsageRow:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self, group_by: GroupBy) -> dict[str, str | int]:
        return {
            group_by: self.group,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class UsageReport:
    """A usage query's rows (at most its limit), with the totals and the number of groups
    over all of them."""

    rows: list[UsageRow]
    total: UsageRow
    groups: int

    @property
    def truncated(self) -> bool:
        return self.groups > len(self.rows)


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def _day(name: str, text: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name} is a UTC day, YYYY-MM-DD", param=name) from None


def day_range(since: str | None, until: str | None, today: str) -> tuple[str, str]:
    """The first and last day (YYYY-MM-DD, UTC, both included) of a usage query; by default
    the last 30 days. InvalidRequest for a malformed date, an empty or a too long range."""
    last = _day("until", until) if until is not None else date.fromisoformat(today)
    first = _day("since", since) if since is not None else last - timedelta(days=29)
    if first > last:
        raise InvalidRequest("since is after until", param="since")
    days = (last - first).days + 1
    if days > MAX_DAYS:
        raise InvalidRequest(
            f"the range is {days} days; usage is read at most {MAX_DAYS} days at a time",
            param="since",
        )
    return first.isoformat(), last.isoformat()


class UsageStore:
    """The per-day sums in SQLite. Its methods block: call them from a thread."""

    ph = "?"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        private_sqlite(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        self._open(db)

    def _open(self, db: Any) -> None:
        self._lock = threading.Lock()
        self._db = db
        db.execute(_SCHEMA)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, batch: dict[Row, tuple[int, int, int]]) -> None:
        """Add a batch of sums, in one transaction; several instances may add at once."""
        rows = [(*k, *v) for k, v in batch.items()]
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                cur.executemany(self._sql(_ADD), rows)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def report(self, since: str, until: str, group_by: GroupBy, limit: int) -> UsageReport:
        """The sums per group from `since` to `until`, at most `limit` groups: per day in
        date order, per key, user or model the largest token users first. The totals and the
        number of groups cover every group, also those past `limit` (one pass: the window
        sums run over the grouped rows before the limit)."""
        column = _COLUMNS[group_by]  # from a fixed table, never from the request
        order = (
            "day"
            if group_by == "day"
            else f"SUM(prompt_tokens) + SUM(completion_tokens) DESC, {column}"
        )
        sql = (
            f"SELECT {column}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), "
            "COUNT(*) OVER (), SUM(SUM(requests)) OVER (), SUM(SUM(prompt_tokens)) OVER (), "
            "SUM(SUM(completion_tokens)) OVER () "
            f"FROM usage_daily WHERE day >= ? AND day <= ? GROUP BY {column} "
            f"ORDER BY {order} LIMIT ?"
        )
        with self._lock:
            cur = self._db.cursor()
            cur.execute(self._sql(sql), (since, until, limit))
            found = cur.fetchall()
        rows = [UsageRow(str(g), int(r), int(p), int(c)) for g, r, p, c, *_ in found]
        if not found:
            return UsageReport(rows, UsageRow("all", 0, 0, 0), 0)
        groups, r, p, c = found[0][4:]
        return UsageReport(rows, UsageRow("all", int(r), int(p), int(c)), int(groups))

    def query(self, since: str, until: str, group_by: GroupBy, limit: int) -> list[UsageRow]:
        return self.report(since, until, group_by, limit).rows


class PostgresUsageStore(UsageStore):
    """The sums in the audit log's PostgreSQL database, shared by every instance using it."""

    ph = "%s"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("usage in PostgreSQL needs: pip install 'llmhost[postgres]'") from exc
        try:
            db = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to the usage database: {exc}") from exc
        self.path = Path(url.rpartition("@")[2])  # no password in what is shown
        self._open(db)


def open_usage_store(url: str | None, path: Path) -> UsageStore:
    """PostgreSQL where the audit log is there (so instances share one account), else the
    SQLite file."""
    if url:
        return PostgresUsageStore(url)
    return UsageStore(path)


class UsageRecorder:
    """Sums in memory on the event loop, written to the store by a background task."""

    def __init__(
        self,
        store: UsageStore,
        *,
        every: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.every = every
        self.clock = clock
        self.pending: dict[Row, tuple[int, int, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()

    def add(
        self,
        key_id: str | None,
        user_id: str,
        model: str,
        prompt: int,
        completion: int,
        *,
        at: float | None = None,
    ) -> None:
        """One finished request, counted on the UTC day of `at` (when it started, as its
        audit record and quotas count it; default now)."""
        row = (utc_day(self.clock() if at is None else at), key_id or "", user_id, model)
        r, p, c = self.pending.get(row, (0, 0, 0))
        self.pending[row] = (r + 1, p + max(0, prompt), c + max(0, completion))
        if len(self.pending) >= MAX_PENDING:
            self._wake.set()

    async def flush(self) -> None:
        """Write what is pending (a failed write keeps it for the next try)."""
        async with self._flushing:
            if not self.pending:
                return
            batch, self.pending = self.pending, {}
            try:
                await asyncio.to_thread(self.store.add, batch)
            except Exception:  # sqlite3's or psycopg's errors: the sums wait for the next try
                if len(batch) + len(self.pending) > MAX_HELD:
                    log.exception("usage of %d rows dropped: the store keeps failing", len(batch))
                    return
                log.exception("usage not written yet (%d rows kept for the next try)", len(batch))
                for row, (r, p, c) in batch.items():
                    r2, p2, c2 = self.pending.get(row, (0, 0, 0))
                    self.pending[row] = (r + r2, p + p2, c + c2)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.every)
            self._wake.clear()
            await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the background task and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def query(
        self, since: str, until: str, group_by: GroupBy, limit: int = 10_000
    ) -> list[UsageRow]:
        """The sums from `since` to `until` (UTC days, both included), what is pending too."""
        return (await self.report(since, until, group_by, limit)).rows

    async def report(
        self, since: str, until: str, group_by: GroupBy, limit: int = 10_000
    ) -> UsageReport:
        """As `query`, with the totals and the number of groups over every group."""
        await self.flush()
        return await asyncio.to_thread(self.store.report, since, until, group_by, limit)


def to_json(rows: list[UsageRow], group_by: GroupBy, since: str, until: str) -> str:
    """Rows as the admin API's JSON list."""
    return json.dumps(
        {
            "object": "list",
            "since": since,
            "until": until,
            "group_by": group_by,
            "data": [r.as_dict(group_by) for r in rows],
        }
    )


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def to_csv(rows: list[UsageRow], group_by: GroupBy) -> str:
    """Rows as CSV; a cell that a spreadsheet would run as a formula is prefixed with '."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([group_by, "requests", "prompt_tokens", "completion_tokens", "total_tokens"])
    for row in rows:
        group = "'" + row.group if row.group.startswith(_FORMULA_START) else row.group
        writer.writerow(
            [group, row.requests, row.prompt_tokens, row.completion_tokens, row.total_tokens]
        )
    return out.getvalue()
