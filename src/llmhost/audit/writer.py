"""Writes audit records off the request path: requests only enqueue; one task writes batches
in a thread. `close()` drains the queue, so a graceful shutdown loses nothing. Also runs the
daily retention purge.

What the writer guarantees, whatever a record holds:
- Each submitted item becomes exactly one stored record. Preparing it (`prepare`: redaction,
  hashing of the prompt) runs in the writer's thread, never on the event loop; an item whose
  preparation fails is stored with the failure noted in place of the prompt.
- Text a database cannot take (lone surrogates, NUL) is stored escaped (`\\ud800`, `\\x00`).
- A batch that fails is retried; if it keeps failing it is split in halves until the records
  that fail are alone, so one bad record never takes another request's record with it. A
  record that still cannot be written is counted (`dropped`, `on_drop`) and logged with its
  request id: never lost silently."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from llmhost.audit.store import AuditRecord, SqlAuditStore

log = logging.getLogger("llmhost.audit")

MAX_BATCH = 512
DAY = 86400.0
RETRIES = 5  # of a whole batch, with backoff (0.2 s doubling: ~6 s), before it is split
SPLIT_RETRIES = 2  # of each half once a batch is being split


def storable(text: str) -> str:
    """`text` as any database stores it: unchanged unless it holds a lone surrogate or NUL,
    which are written as backslash escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text


def storable_record(rec: AuditRecord) -> AuditRecord:
    changes: dict[str, Any] = {
        f.name: storable(v)
        for f in dataclasses.fields(rec)
        if isinstance(v := getattr(rec, f.name), str) and storable(v) is not v
    }
    return dataclasses.replace(rec, **changes) if changes else rec


def _identity(item: Any) -> AuditRecord:
    rec: AuditRecord = item  # the default: items are records already
    return rec


def _fallback(item: Any, exc: Exception) -> AuditRecord:
    """The record of an item whose preparation failed: everything but the prompt."""
    rec = getattr(item, "record", item)
    if not isinstance(rec, AuditRecord):
        rec = AuditRecord(0.0, "", "", "unknown", "", 0)
    note = f"[prompt not recorded: {type(exc).__name__}]"
    return dataclasses.replace(rec, prompt=note)


class AuditWriter:
    def __init__(
        self,
        store: SqlAuditStore,
        *,
        retention_days: float = 90.0,
        purge_every: float = DAY,
        on_write: Callable[[int, float], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        prepare: Callable[[Any], AuditRecord] | None = None,
        retry_delay: float = 0.2,
    ):
        self.store = store
        self.retention_s = retention_days * DAY
        self.purge_every = purge_every
        self.on_write = on_write  # (records written, oldest wait in seconds): for metrics
        self.on_drop = on_drop  # (records that could not be written): for metrics
        self.prepare = prepare or _identity
        self.retry_delay = retry_delay
        self.queue: asyncio.Queue[tuple[float, Any] | None] = asyncio.Queue()
        self.written = 0
        self.failures = 0  # failed write attempts
        self.dropped = 0  # records given up on
        self._task: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmhost-audit-writer")
        if self.retention_s > 0:
            self._purger = asyncio.create_task(self._purge_loop(), name="llmhost-audit-purge")

    def submit(self, item: Any) -> None:
        """Never blocks and never raises into the request. `item` is an AuditRecord, or
        whatever `prepare` turns into one."""
        self.queue.put_nowait((time.monotonic(), item))

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self.queue.get()
            batch = []
            while True:
                if item is None:  # close(): everything before it is in this batch or written
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= MAX_BATCH or self.queue.empty():
                    break
                item = self.queue.get_nowait()
            if batch:
                try:
                    await self._write(batch)
                except Exception:  # never let the writer die: count and go on
                    log.exception("audit writer failed on a batch of %d", len(batch))
                    self._drop(batch, "writer error")

    def _prepare_all(self, batch: list[tuple[float, Any]]) -> list[tuple[float, AuditRecord]]:
        out = []
        for t, item in batch:
            try:
                rec = self.prepare(item)
            except Exception as exc:
                log.error("audit record could not be prepared (%s); stored without prompt", exc)
                rec = _fallback(item, exc)
            out.append((t, storable_record(rec)))
        return out

    async def _write(self, batch: list[tuple[float, Any]]) -> None:
        prepared = await asyncio.to_thread(self._prepare_all, batch)
        await self._append(prepared, RETRIES)

    async def _append(self, batch: list[tuple[float, AuditRecord]], tries: int) -> None:
        error: Exception | None = None
        for attempt in range(tries):
            try:
                await asyncio.to_thread(self.store.append, [r for _, r in batch])
            except Exception as exc:  # a locked or full disk, or a record the store refuses
                error = exc
                self.failures += 1
                log.error(
                    "audit write of %d records failed (attempt %d): %s",
                    len(batch),
                    attempt + 1,
                    exc,
                )
                if attempt + 1 < tries:
                    await asyncio.sleep(self.retry_delay * 2**attempt)
                continue
            self.written += len(batch)
            if self.on_write is not None:
                self.on_write(len(batch), time.monotonic() - batch[0][0])
            return
        if len(batch) > 1:
            half = len(batch) // 2
            await self._append(batch[:half], SPLIT_RETRIES)
            await self._append(batch[half:], SPLIT_RETRIES)
            return
        self._drop(batch, str(error))

    def _drop(self, batch: list[tuple[float, Any]], why: str) -> None:
        for _, item in batch:
            rid = getattr(getattr(item, "record", item), "request_id", "?")
            log.critical("audit record of request %s could not be written: %s", rid, why)
        self.count_dropped(len(batch))

    def count_dropped(self, n: int) -> None:
        """Records lost (each already logged): counted here and in the metric."""
        self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)

    async def _purge_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                n = await asyncio.to_thread(self.store.purge, self.retention_s)
                if n:
                    log.info(
                        "audit retention: removed %d records older than %.0f days",
                        n,
                        self.retention_s / DAY,
                    )
            await asyncio.sleep(self.purge_every)

    async def close(self) -> None:
        """Write everything queued so far, then stop."""
        if self._purger is not None:
            self._purger.cancel()
        if self._task is not None and not self._task.done():
            self.queue.put_nowait(None)
            await self._task
