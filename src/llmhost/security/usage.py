"""Usage accounting: requests and tokens per API key, user and model per UTC day, added up as
requests finish (never by reading the audit log back). The request path only adds to a dict
in memory; a background task writes the sums to `$LLMHOST_HOME/usage.db` (SQLite, 0600) in a
thread about once a second, one transaction per batch, and the last batch on shutdown. Where
the audit log is in PostgreSQL, the sums are too, so several instances keep one account.

A report reads rollups, not the daily rows: the sums per key, per user and per model over
aligned blocks of 1, 2, 4, ... 256 days (a block of 2^L days starts on a day number divisible
by 2^L), written with the daily rows. Any range of days is at most two blocks per level, so a
report over a year reads at most 17 blocks per group, however busy the days were."""

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
_SCHEMA_BLOCKS = """
CREATE TABLE IF NOT EXISTS usage_blocks (
    dim TEXT NOT NULL,
    level INTEGER NOT NULL,
    start INTEGER NOT NULL,
    grp TEXT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (dim, level, start, grp)
)
"""
_ADD_BLOCK = (
    "INSERT INTO usage_blocks VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (dim, level, start, grp) DO UPDATE SET "
    "requests = usage_blocks.requests + excluded.requests, "
    "prompt_tokens = usage_blocks.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = usage_blocks.completion_tokens + excluded.completion_tokens"
)
LEVELS = 9  # blocks of 1 to 256 days: any range of up to 366 days is covered
_EPOCH = date(1970, 1, 1)
_DIMS: tuple[tuple[GroupBy, int], ...] = (("key", 1), ("user", 2), ("model", 3))
Block = tuple[str, int, int, str]  # dim, level, start (day number), group


def day_number(day: str) -> int:
    return (date.fromisoformat(day) - _EPOCH).days


def blocks(batch: dict[Row, tuple[int, int, int]]) -> dict[Block, tuple[int, int, int]]:
    """The rollups a batch of daily sums adds to: per key, user and model at every level,
    and per day (dim "day", level 0, the group empty)."""
    out: dict[Block, tuple[int, int, int]] = {}

    def add(block: Block, r: int, p: int, c: int) -> None:
        r0, p0, c0 = out.get(block, (0, 0, 0))
        out[block] = (r0 + r, p0 + p, c0 + c)

    for row, (r, p, c) in batch.items():
        n = day_number(row[0])
        add(("day", 0, n, ""), r, p, c)
        for dim, column in _DIMS:
            for level in range(LEVELS):
                add((dim, level, n >> level << level, row[column]), r, p, c)
    return out


def cover(first: int, last: int) -> list[tuple[int, int]]:
    """The aligned blocks (level, start) that tile the days `first`..`last` exactly: the
    largest that fits at each step, so at most two per level."""
    out = []
    n = first
    while n <= last:
        level = LEVELS - 1
        while level and (n % (1 << level) or n + (1 << level) - 1 > last):
            level -= 1
        out.append((level, n))
        n += 1 << level
    return out


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
        db.execute(_SCHEMA_BLOCKS)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, batch: dict[Row, tuple[int, int, int]]) -> None:
        """Add a batch of sums and their rollups, in one transaction; several instances may
        add at once."""
        # in a fixed order, so that two instances writing at once take their row locks in
        # the same order (PostgreSQL) rather than deadlock
        rows = sorted((*k, *v) for k, v in batch.items())
        rolled = sorted((*k, *v) for k, v in blocks(batch).items())
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                cur.executemany(self._sql(_ADD), rows)
                cur.executemany(self._sql(_ADD_BLOCK), rolled)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def report(self, since: str, until: str, group_by: GroupBy, limit: int) -> UsageReport:
        """The sums per group from `since` to `until`, at most `limit` groups: per day in
        date order, per key, user or model the largest token users first. The totals and the
        number of groups cover every group, also those past `limit` (one pass: the window
        sums run over the grouped rows before the limit)."""
        first, last = day_number(since), day_number(until)
        args: list[object]
        if group_by == "day":
            source = (
                "(SELECT start AS grp, requests, prompt_tokens, completion_tokens "
                "FROM usage_blocks WHERE dim = 'day' AND level = 0 AND start >= ? AND start <= ?)"
            )
            args, order = [first, last], "grp"
        else:
            # one index search per block (an OR or IN over the blocks would scan the dim)
            one = (
                "SELECT grp, requests, prompt_tokens, completion_tokens FROM usage_blocks "
                "WHERE dim = ? AND level = ? AND start = ?"
            )
            tiles = cover(first, last)
            source = "(" + " UNION ALL ".join([one] * len(tiles)) + ")"
            args = [x for level, start in tiles for x in (group_by, level, start)]
            order = "SUM(prompt_tokens) + SUM(completion_tokens) DESC, grp"
        sql = (
            "SELECT grp, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), "
            "COUNT(*) OVER (), SUM(SUM(requests)) OVER (), SUM(SUM(prompt_tokens)) OVER (), "
            f"SUM(SUM(completion_tokens)) OVER () FROM {source} AS b "
            f"GROUP BY grp ORDER BY {order} LIMIT ?"
        )
        with self._lock:
            cur = self._db.cursor()
            cur.execute(self._sql(sql), (*args, limit))
            found = cur.fetchall()

        def name(g: object) -> str:
            return (
                (_EPOCH + timedelta(days=int(str(g)))).isoformat() if group_by == "day" else str(g)
            )

        rows = [UsageRow(name(g), int(r), int(p), int(c)) for g, r, p, c, *_ in found]
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
