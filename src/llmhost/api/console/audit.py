"""The console's audit page: a bounded search of the audit store (newest first, a page at a
time, in a thread), prompts redacted again for display, and the hash chain's check run on
demand in a thread, one at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from llmhost.audit.records import StoredRecord
from llmhost.audit.store import SqlAuditStore
from llmhost.security.redact import Redactor

if TYPE_CHECKING:
    from llmhost.api.console.app import VerifyState

PAGE_SIZE = 50
MAX_PAGE = 200  # past 10,000 rows, narrow the search instead
PROMPT_CHARS = 400  # of a prompt shown in a row
TIME_FORMAT = "%Y-%m-%dT%H:%M"  # an <input type="datetime-local">, read as UTC


def _utc(text: str) -> float:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()


@dataclass(frozen=True)
class AuditQuery:
    """The audit page's filters as the form sent them, and what they mean."""

    user: str = ""
    model: str = ""
    status: str = ""
    since: str = ""
    until: str = ""
    page: int = 1
    error: str | None = None  # a filter that could not be read

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> AuditQuery:
        def get(name: str, limit: int) -> str:
            return params.get(name, "").strip()[:limit]

        q = cls(
            get("user", 128),
            get("model", 256),
            get("status", 3),
            get("since", 16),
            get("until", 16),
        )
        page_text = get("page", 4)
        page = int(page_text) if page_text.isdigit() else 1
        error = None
        if q.status and not (q.status.isdigit() and 100 <= int(q.status) <= 599):
            error = "the status is a number from 100 to 599"
        for name, text in (("since", q.since), ("until", q.until)):
            try:
                if text:
                    _utc(text)
            except ValueError:
                error = f"'{name}' is a date and time like 2026-01-31T13:45 (UTC)"
        return cls(q.user, q.model, q.status, q.since, q.until, min(max(page, 1), MAX_PAGE), error)

    def url(self, page: int) -> str:
        fields = {
            "user": self.user,
            "model": self.model,
            "status": self.status,
            "since": self.since,
            "until": self.until,
        }
        kept = {k: v for k, v in fields.items() if v}
        return "?" + urlencode({**kept, "page": page})


@dataclass(frozen=True)
class Row:
    seq: int
    time: str
    user: str
    client_ip: str
    route: str
    model: str
    status: int
    prompt: str
    tokens: str
    latency_ms: str


@dataclass(frozen=True)
class AuditPage:
    rows: list[Row]
    page: int
    prev_url: str | None
    next_url: str | None


def _row(rec: StoredRecord, redactor: Redactor) -> Row:
    prompt = rec.prompt or ""
    cut = len(prompt) > PROMPT_CHARS
    prompt = redactor.redact(prompt[:PROMPT_CHARS]) + ("…" if cut else "")
    return Row(
        seq=rec.seq,
        time=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.ts)),
        user=rec.user_id,
        client_ip=rec.client_ip,
        route=rec.route,
        model=rec.model,
        status=rec.status,
        prompt=prompt,
        tokens=f"{rec.prompt_tokens} / {rec.completion_tokens}",
        latency_ms=f"{rec.latency_ms:.0f}",
    )


def _search(store: SqlAuditStore, query: AuditQuery) -> AuditPage:
    found = store.search(
        user=query.user or None,
        model=query.model or None,
        status=int(query.status) if query.status else None,
        since=_utc(query.since) if query.since else None,
        until=_utc(query.until) if query.until else None,
        limit=PAGE_SIZE + 1,  # one more tells whether a next page exists
        offset=(query.page - 1) * PAGE_SIZE,
        newest_first=True,
    )
    # Prompts are redacted when written (unless the server keeps them whole): once more
    # here, so a page shown on a screen never carries what the redactor recognises.
    redactor = Redactor()
    rows = [_row(r, redactor) for r in found[:PAGE_SIZE]]
    more = len(found) > PAGE_SIZE and query.page < MAX_PAGE
    return AuditPage(
        rows=rows,
        page=query.page,
        prev_url=query.url(query.page - 1) if query.page > 1 else None,
        next_url=query.url(query.page + 1) if more else None,
    )


async def audit_page(store: SqlAuditStore, query: AuditQuery) -> AuditPage:
    """A page of the search, off the event loop (the query and the redaction)."""
    return await asyncio.to_thread(_search, store, query)


async def verify_chain(
    store: SqlAuditStore, state: VerifyState, clock: Callable[[], float]
) -> None:
    """Checks the chain in a thread unless a check is already running (a second press of
    the button waits for the one running instead of starting another)."""
    if state.lock.locked():
        async with state.lock:
            return
    async with state.lock:
        report = await asyncio.to_thread(store.verify)
        state.report, state.at = report, clock()
