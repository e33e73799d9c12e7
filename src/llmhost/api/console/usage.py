"""The console's usage page: requests and tokens per key, user, model or UTC day over a range
of days, read from the usage accounting (never the audit log), and the same as CSV."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import get_args

from starlette.datastructures import QueryParams

from llmhost.errors import InvalidRequest
from llmhost.security.usage import GroupBy, UsageRecorder, UsageReport, day_range, to_csv, utc_day

GROUPS: tuple[GroupBy, ...] = get_args(GroupBy)
PAGE_ROWS = 1000  # rows shown on the page
CSV_ROWS = 100_000  # rows in a CSV export, as the admin API's most


@dataclass(frozen=True)
class UsageQuery:
    since: str
    until: str
    group_by: GroupBy
    error: str | None = None

    @classmethod
    def from_params(cls, params: QueryParams, today: str) -> UsageQuery:
        """The days and grouping asked for (the last 30 days per day by default); a bad value
        is kept as `error` with the defaults, for the page to say."""
        raw = params.get("group_by") or "day"
        group_by: GroupBy = "day"
        for g in GROUPS:
            if raw == g:
                group_by = g
        since, until = params.get("since") or None, params.get("until") or None
        try:
            if raw != group_by:
                raise InvalidRequest(f"group by one of: {', '.join(GROUPS)}")
            first, last = day_range(since and since[:32], until and until[:32], today)
        except InvalidRequest as exc:
            first, last = day_range(None, None, today)
            return cls(first, last, group_by, exc.message)
        return cls(first, last, group_by)


async def usage_table(usage: UsageRecorder, q: UsageQuery) -> UsageReport:
    """The page's rows (the first `PAGE_ROWS`), with the totals over every row."""
    return await usage.report(q.since, q.until, q.group_by, PAGE_ROWS)


async def usage_csv(usage: UsageRecorder, q: UsageQuery) -> str:
    rows = await usage.query(q.since, q.until, q.group_by, CSV_ROWS)
    return await asyncio.to_thread(to_csv, rows, q.group_by)  # up to 100,000 rows


def today(usage: UsageRecorder) -> str:
    return utc_day(usage.clock())
