"""The usage accounts: sums per UTC day written in batches to an owner-only SQLite file and
added to (not replaced) on the next batch, grouped four ways, a query's day range checked and
bounded, and CSV a spreadsheet will not run as formulas."""

from __future__ import annotations

import csv
import io
import random
import sqlite3
import stat
from datetime import date, datetime, timedelta, timezone

import pytest

from llmhost.errors import InvalidRequest
from llmhost.security.usage import (
    LEVELS,
    MAX_DAYS,
    UsageRecorder,
    UsageRow,
    UsageStore,
    cover,
    day_range,
    to_csv,
)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


async def test_sums_per_day_written_in_batches(tmp_path):
    now = [ts("2026-11-27 23:59:59")]
    recorder = UsageRecorder(UsageStore(tmp_path / "usage.db"), clock=lambda: now[0])
    recorder.add("k1", "alice", "m1", 3, 4)
    recorder.add("k1", "alice", "m1", 2, 2)
    recorder.add(None, "bob", "m2", 1, 0)
    await recorder.flush()
    assert recorder.pending == {}
    now[0] = ts("2026-11-28 00:00:00")
    recorder.add("k1", "alice", "m1", 10, 10)
    recorder.add("k2", "alice", "m2", 5, -3)  # never a negative count
    await recorder.close()
    assert stat.S_IMODE((tmp_path / "usage.db").stat().st_mode) == 0o600

    store = UsageStore(tmp_path / "usage.db")  # as written, after the recorder closed
    by_day = store.query("2026-11-01", "2026-11-30", "day", 100)
    assert by_day == [UsageRow("2026-11-27", 3, 6, 6), UsageRow("2026-11-28", 2, 15, 10)]
    assert store.query("2026-11-01", "2026-11-27", "day", 100) == by_day[:1]
    by_user = store.query("2026-11-27", "2026-11-28", "user", 100)
    assert by_user == [UsageRow("alice", 4, 20, 16), UsageRow("bob", 1, 1, 0)]
    by_key = store.query("2026-11-27", "2026-11-28", "key", 100)
    # the largest token users first (31, 5 and 1 tokens)
    assert [(r.group, r.requests) for r in by_key] == [("k1", 3), ("k2", 1), ("", 1)]
    by_model = store.query("2026-11-28", "2026-11-28", "model", 1)
    assert by_model == [UsageRow("m1", 1, 10, 10)] and by_model[0].total_tokens == 20
    # a report cut at its limit still totals every group
    top = store.report("2026-11-27", "2026-11-28", "key", 1)
    assert top.rows == [UsageRow("k1", 3, 15, 16)]
    assert top.total == UsageRow("all", 5, 21, 16) and top.groups == 3 and top.truncated
    whole = store.report("2026-11-27", "2026-11-28", "user", 10)
    assert whole.total == UsageRow("all", 5, 21, 16) and not whole.truncated
    empty = store.report("2020-01-01", "2020-01-31", "model", 10)
    assert empty.rows == [] and empty.total.requests == 0 and empty.groups == 0
    store.close()


async def test_a_query_includes_what_is_not_written_yet(tmp_path):
    recorder = UsageRecorder(UsageStore(tmp_path / "usage.db"), clock=lambda: ts("2026-01-05"))
    recorder.add("k", "u", "m", 1, 1)
    rows = await recorder.query("2026-01-01", "2026-01-31", "day")
    assert rows == [UsageRow("2026-01-05", 1, 1, 1)]
    await recorder.close()


def test_day_range_defaults_and_bounds():
    assert day_range(None, None, "2026-11-27") == ("2026-10-29", "2026-11-27")
    assert day_range("2026-01-01", "2026-12-31", "2026-11-27") == ("2026-01-01", "2026-12-31")
    assert day_range("2024-01-01", "2024-12-31", "x") == ("2024-01-01", "2024-12-31")  # 366
    with pytest.raises(InvalidRequest, match="367 days; usage is read at most 366"):
        day_range("2025-01-01", "2026-01-02", "2026-11-27")
    with pytest.raises(InvalidRequest, match="at most 366 days"):
        day_range("2016-01-01", "2026-01-01", "2026-11-27")
    with pytest.raises(InvalidRequest, match="since is after until"):
        day_range("2026-02-01", "2026-01-01", "2026-11-27")
    for bad in ("2026-13-01", "2026-1-1", "yesterday", "2026-01-01T00", ""):
        with pytest.raises(InvalidRequest, match="since is a UTC day"):
            day_range(bad, None, "2026-11-27")


def test_csv_parses_and_defuses_formulas():
    rows = [UsageRow("=cmd|'/c calc'!A1", 1, 2, 3), UsageRow("alice,bob", 4, 5, 6)]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, "user"))))
    assert parsed[0] == ["user", "requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    assert parsed[1] == ["'=cmd|'/c calc'!A1", "1", "2", "3", "5"]
    assert parsed[2] == ["alice,bob", "4", "5", "6", "11"]


async def test_a_failed_write_keeps_the_sums_for_the_next(tmp_path):
    store = UsageStore(tmp_path / "usage.db")
    recorder = UsageRecorder(store, clock=lambda: ts("2026-01-05"))
    recorder.add("k", "u", "m", 1, 2)
    real_add = store.add

    def broken(batch):
        raise sqlite3.OperationalError("disk I/O error")

    store.add = broken  # type: ignore[method-assign]
    await recorder.flush()
    recorder.add("k", "u", "m", 1, 2)
    assert recorder.pending == {("2026-01-05", "k", "u", "m"): (2, 2, 4)}
    store.add = real_add  # type: ignore[method-assign]
    await recorder.close()
    assert store.query("2026-01-01", "2026-01-31", "day", 10) == [UsageRow("2026-01-05", 2, 2, 4)]


async def test_a_request_counts_on_the_day_it_started(tmp_path):
    recorder = UsageRecorder(UsageStore(tmp_path / "usage.db"), clock=lambda: ts("2026-01-06"))
    recorder.add("k", "u", "m", 1, 2, at=ts("2026-01-05 23:59:59"))
    rows = await recorder.query("2026-01-01", "2026-01-31", "day")
    assert rows == [UsageRow("2026-01-05", 1, 1, 2)]
    await recorder.close()


@pytest.mark.parametrize("seed", range(40))
def test_blocks_tile_any_range_exactly(seed):
    rng = random.Random(seed)
    first = rng.randrange(19_000, 21_000)
    last = first + rng.randrange(0, MAX_DAYS)
    tiles = cover(first, last)
    days = [d for level, start in tiles for d in range(start, start + (1 << level))]
    assert days == list(range(first, last + 1))  # in order, no gap, no overlap
    for level, start in tiles:
        assert 0 <= level < LEVELS and start % (1 << level) == 0
    per_level = [sum(1 for lv, _ in tiles if lv == level) for level in range(LEVELS)]
    assert max(per_level) <= 2 + (last - first + 1) // (1 << (LEVELS - 1))


@pytest.mark.parametrize("seed", range(6))
def test_reports_from_rollups_match_the_daily_rows(tmp_path, seed):
    """Random traffic written in random batches; every report (each grouping, random ranges,
    a limit that cuts) equals the sums worked out from the raw rows."""
    rng = random.Random(seed)
    store = UsageStore(tmp_path / "usage.db")
    raw: list[tuple[str, str, str, str, int, int, int]] = []
    start = date(2026, 1, 1)
    for _ in range(rng.randrange(3, 12)):
        batch: dict = {}
        for _ in range(rng.randrange(1, 200)):
            row = (
                (start + timedelta(days=rng.randrange(400))).isoformat(),
                f"k{rng.randrange(30)}",
                f"u{rng.randrange(8)}",
                f"m{rng.randrange(3)}",
            )
            sums = (rng.randrange(1, 5), rng.randrange(0, 900), rng.randrange(0, 400))
            old = batch.get(row, (0, 0, 0))
            batch[row] = tuple(a + b for a, b in zip(old, sums, strict=True))
            raw.append((*row, *sums))
        store.add(batch)
    column = {"day": 0, "key": 1, "user": 2, "model": 3}
    for _ in range(25):
        a = start + timedelta(days=rng.randrange(420))
        b = a + timedelta(days=rng.randrange(MAX_DAYS))
        since, until = a.isoformat(), b.isoformat()
        for group_by in ("day", "key", "user", "model"):
            want: dict[str, list[int]] = {}
            for r in raw:
                if since <= r[0] <= until:
                    s = want.setdefault(r[column[group_by]], [0, 0, 0])
                    for i in range(3):
                        s[i] += r[4 + i]
            limit = rng.choice([1, 5, 1000])
            got = store.report(since, until, group_by, limit)
            assert got.groups == len(want)
            assert (got.total.requests, got.total.prompt_tokens, got.total.completion_tokens) == (
                tuple(sum(v[i] for v in want.values()) for i in range(3))
            )
            rows = {r.group: [r.requests, r.prompt_tokens, r.completion_tokens] for r in got.rows}
            assert len(got.rows) == min(limit, len(want))
            assert all(want[g] == v for g, v in rows.items())
            if group_by == "day":
                assert [r.group for r in got.rows] == sorted(want)[:limit]
            else:  # the largest token users, ties by name
                order = sorted(want, key=lambda g: (-(want[g][1] + want[g][2]), g))
                assert [r.group for r in got.rows] == order[:limit]
    store.close()
