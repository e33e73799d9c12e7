"""Keep a command running: restart it with backoff when it dies abnormally (a crash, kill -9,
the OOM killer), pass SIGTERM/SIGINT on to it, and stop when it exits cleanly. What
`llmhost serve --restart-on-crash` runs, for hosts without systemd."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence

log = logging.getLogger("llmhost.supervise")


def supervise(
    cmd: Sequence[str],
    *,
    max_backoff: float = 30.0,
    healthy_after: float = 60.0,
    max_restarts: int | None = None,
) -> int:
    """Run `cmd` until it exits 0 or we are told to stop; returns the last exit code."""
    child: subprocess.Popen | None = None
    stopping = False

    def forward(sig, frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    backoff, restarts = 1.0, 0
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(list(cmd))
            rc = child.wait()
            if stopping or rc == 0:
                return rc
            if max_restarts is not None and restarts >= max_restarts:
                log.error("server exited with %s; giving up after %d restarts", rc, restarts)
                return rc
            if time.monotonic() - started > healthy_after:
                backoff = 1.0  # it ran fine for a while: this is a new failure, not a loop
            log.warning("server exited with %s; restarting in %.0f s", rc, backoff)
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            if stopping:
                return rc
            backoff = min(backoff * 2, max_backoff)
            restarts += 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
