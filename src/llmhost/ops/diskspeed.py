"""Sequential read speed of a folder's disk: a fresh test file read back with O_DIRECT where
the filesystem allows it (else with its pages dropped from the cache first), so the page
cache does not flatter the disk."""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from pathlib import Path

BLOCK = 4 << 20


def _reopen_uncached(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def sequential_read(folder: Path, size: int) -> tuple[float, bool]:
    """(MB/s, whether O_DIRECT was used) for reading `size` bytes written to `folder`."""
    path = folder / f".llmhost-doctor-{os.getpid()}"
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BLOCK))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(max(1, size // BLOCK)):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        direct = hasattr(os, "O_DIRECT")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT) if direct else _reopen_uncached(path)
        except OSError:
            direct, fd = False, _reopen_uncached(path)
        try:
            t0, got = time.perf_counter(), 0
            while True:
                try:
                    n = os.readv(fd, [buf])
                except OSError:  # O_DIRECT refused at read time (tmpfs and some FUSE)
                    if not direct:
                        raise
                    direct = False
                    os.close(fd)
                    fd = _reopen_uncached(path)
                    t0, got = time.perf_counter(), 0
                    continue
                if n <= 0:
                    break
                got += n
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return got / max(elapsed, 1e-9) / 1e6, direct
