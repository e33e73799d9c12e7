"""Reading a model's weights at a lower CPU priority: when other models serve on the same
cores, their decoding goes first and a load takes what is left (a load reads and repacks
gigabytes; requests in flight must not wait on that). Only the read runs in the lowered
thread: threads a thread creates inherit its priority, and an engine's serving threads are
created afterwards, at the priority they would have had. The server sweeps the decrypted copies
that killed loads left in tmpfs through here as well (`clean_stale`)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

# Re-exported: the engines make the decrypted copies (store.in_memory), and the api layer, which
# never reaches into the store, sweeps them through the engines.
from llmhost.store.in_memory import clean_stale as clean_stale

T = TypeVar("T")
LOAD_NICENESS = 10  # added to the process's: a load yields the CPU to serving threads


def at_low_priority(fn: Callable[[], T]) -> T:
    """`fn()` in a short-lived thread of lower priority; returns or raises what it does."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
            tid = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, nice + LOAD_NICENESS)
        try:
            result.append(fn())
        except BaseException as exc:  # raised again in the caller's thread
            error.append(exc)

    worker = threading.Thread(target=run, name="model-read", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
