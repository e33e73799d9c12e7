"""Writes audit records off the request path: requests only enqueue; one task writes batches
in a thread. `close()` drains the queue, so a graceful shutdown loses nothing. Also runs the
daily retention purge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from llmhost.audit.store import AuditRecord, SqlAuditStore

log = logging.getLogger("llmhost.audit")

MAX_BATCH = 512
DAY = 86400.0


class AuditWriter:
    def __init__(
        self,
        store: SqlAuditStore,
        *,
        retention_days: float = 90.0,
        purge_every: float = DAY,
        on_write: Callable[[int, float], None] | None = None,
    ):
        self.store = store
        self.retention_s = retention_days * DAY
        self.purge_every = purge_every
        self.on_write = on_write  # (records written, oldest wait in seconds): for metrics
        self.queue: asyncio.Queue[tuple[float, AuditRecord] | None] = asyncio.Queue()
        self.written = 0
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._purger: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmhost-audit-writer")
        if self.retention_s > 0:
            self._purger = asyncio.create_task(self._purge_loop(), name="llmhost-audit-purge")

    def submit(self, record: AuditRecord) -> None:
        """Never blocks and never raises into the request."""
        self.queue.put_nowait((time.monotonic(), record))

    @property
    def lag(self) -> int:
        return self.queue.qsize()

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
                await self._write(batch)

    async def _write(self, batch: list[tuple[float, AuditRecord]]) -> None:
        for attempt in range(5):
            try:
                await asyncio.to_thread(self.store.append, [r for _, r in batch])
                break
            except Exception as exc:  # a locked or full disk must not kill the writer
                self.failures += 1
                log.error("audit write failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        else:
            log.critical("dropping %d audit records after repeated failures", len(batch))
            return
        self.written += len(batch)
        if self.on_write is not None:
            self.on_write(len(batch), time.monotonic() - batch[0][0])

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
