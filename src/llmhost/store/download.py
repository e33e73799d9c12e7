"""Segmented, resumable HTTP downloads with checksums computed as the bytes arrive.

Steps for one file (`Downloader.fetch`):
1. `probe`: a one-byte Range request gives the size, the validator (strong ETag, else
   Last-Modified) and whether the server honours Range at all;
2. `<dest>.part` and its state `<dest>.part.json` are reused when they describe the same remote
   object (same size and validator); otherwise the file starts over;
3. the file is preallocated and N threads each fetch one byte range (`If-Range` pins the object:
   a changed file answers 200 and the download restarts rather than mixing versions), writing at
   their offsets; a dropped connection, 5xx or 429 retries with backoff from the last byte
   written; a stream that finishes early takes over half of the largest range still left;
4. the hashes follow the contiguous downloaded front in the calling thread, reading back bytes
   that are still in the page cache, so they are complete right after the last byte (no second
   pass over the file);
5. size and checksums are compared; only then is `.part` renamed to `dest`.

The state file is rewritten every half second, so a killed process re-fetches at most half a
second of bytes per stream. A server without Range support gets one plain stream (no resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol, cast

import httpx

from llmhost.errors import (
    AuthenticationError,
    DownloadError,
    IntegrityError,
    NotFound,
    PermissionDenied,
)

log = logging.getLogger("llmhost.download")

DEFAULT_CONNECTIONS = 16  # as the guide's aria2c -x 16 -s 16: mirrors throttle per connection
MIN_SEGMENT = 4 << 20
_HASH_BLOCK = 4 << 20
_SAVE_EVERY = 0.5


@dataclass
class RemoteFile:
    """One file to fetch: where from, where to (relative), and what it must hash to."""

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    git_sha1: str | None = None  # git blob id, what the Hugging Face Hub lists for small files
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Probe:
    size: int | None
    ranges: bool
    validator: str | None


@dataclass
class FileResult:
    path: str
    size: int
    sha256: str
    md5: str | None = None


class Progress(Protocol):
    def file_started(self, path: str, total: int | None, done: int) -> None: ...
    def advance(self, path: str, n: int) -> None: ...
    def file_done(self, path: str) -> None: ...


class NullProgress:
    def file_started(self, path: str, total: int | None, done: int) -> None:
        pass

    def advance(self, path: str, n: int) -> None:
        pass

    def file_done(self, path: str) -> None:
        pass


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Changed(Exception):
    """The remote object changed under a resumed or segmented download."""


@dataclass
class _Segment:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def left(self) -> int:
        return max(0, self.end - self.pos)


class _Hashes:
    """sha256 always; md5 and the git blob sha1 only when the source publishes them."""

    def __init__(self, size: int | None, md5: bool, git_sha1: bool):
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.sha1 = None
        if git_sha1 and size is not None:
            self.sha1 = hashlib.sha1(usedforsecurity=False)
            self.sha1.update(b"blob %d\0" % size)

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)


def _status_error(r: httpx.Response, url: str) -> Exception:
    code = r.status_code
    where = _display(url)
    if code in (404, 410):
        return NotFound(f"{where}: not found (HTTP {code})")
    if code == 401:
        return AuthenticationError(f"{where}: authentication required (HTTP 401); check the token")
    if code == 403:
        return PermissionDenied(f"{where}: access denied (HTTP 403); check the token or URL")
    if code in (408, 425, 429) or code >= 500:
        return _Retryable(f"{where}: HTTP {code}", _retry_after(r))
    return DownloadError(f"{where}: unexpected HTTP {code}")


def _display(url: str) -> str:
    """A URL without its query string: presigned URLs carry credentials there."""
    return url.split("?", 1)[0]


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _validator(r: httpx.Response) -> str | None:
    etag = r.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return r.headers.get("last-modified")


def _content_range_total(r: httpx.Response) -> int | None:
    value = r.headers.get("content-range", "")
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else None


class Downloader:
    def __init__(
        self,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        min_segment: int = MIN_SEGMENT,
        retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 30.0,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        client: httpx.Client | None = None,
    ):
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.connections = connections
        self.min_segment = max(1, min_segment)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.progress = progress or NullProgress()
        self.stop = stop or threading.Event()
        self._own_client = client is None
        self.client = client or httpx.Client(
            follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=httpx.Limits(max_connections=connections + 4, max_keepalive_connections=16),
            headers={"Accept-Encoding": "identity", "User-Agent": "llmhost"},
        )

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- retries ----------------------------------------------------------------------------

    def _sleep_before_retry(self, failures: int, exc: Exception) -> None:
        if failures > self.retries:
            raise DownloadError(f"gave up after {self.retries} retries: {exc}") from exc
        delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        after = getattr(exc, "retry_after", None)
        if after is not None:
            delay = min(self.max_backoff, max(delay, after))
        delay *= 0.75 + random.random() / 2  # spread reconnects of parallel streams
        log.info("retrying in %.1fs: %s", delay, exc)
        if self.stop.wait(delay):
            raise KeyboardInterrupt

    def _retrying(self, fn: Callable[[], object]) -> object:
        failures = 0
        while True:
            try:
                return fn()
            except (httpx.TransportError, _Retryable) as exc:
                failures += 1
                self._sleep_before_retry(failures, exc)

    # --- probe ------------------------------------------------------------------------------

    def probe(self, rf: RemoteFile) -> Probe:
        def once() -> Probe:
            headers = {**rf.headers, "Range": "bytes=0-0"}
            with self.client.stream("GET", rf.url, headers=headers) as r:
                if r.status_code == 206:
                    return Probe(_content_range_total(r), True, _validator(r))
                if r.status_code == 416:  # an empty file has no byte 0
                    return Probe(_content_range_total(r) or 0, False, _validator(r))
                if r.status_code == 200:
                    length = r.headers.get("content-length")
                    size = int(length) if length and length.isdigit() else None
                    return Probe(size, False, _validator(r))
                raise _status_error(r, rf.url)

        probe = cast(Probe, self._retrying(once))
        if rf.size is not None and probe.size is not None and rf.size != probe.size:
            raise IntegrityError(
                f"{rf.path}: the server has {probe.size} bytes, the source lists {rf.size}"
            )
        if probe.size is None:
            probe.size = rf.size
        return probe

    # --- fetch ------------------------------------------------------------------------------

    def fetch(self, rf: RemoteFile, dest: Path, probe: Probe | None = None) -> FileResult:
        """Download `rf` to `dest` (resuming `dest.part`), checked against its checksums."""
        probe = probe or self.probe(rf)
        part = dest.with_name(dest.name + ".part")
        state = dest.with_name(dest.name + ".part.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            try:
                if probe.ranges and probe.size:
                    hashes = self._segmented(rf, part, state, probe)
                else:
                    hashes = self._single(rf, part, probe)
                break
            except _Changed:
                log.warning("%s changed on the server; starting it over", rf.path)
                part.unlink(missing_ok=True)
                state.unlink(missing_ok=True)
                probe = self.probe(rf)
        else:
            raise DownloadError(f"{rf.path} keeps changing on the server; try again later")
        size = part.stat().st_size
        result = FileResult(
            rf.path,
            size,
            hashes.sha256.hexdigest(),
            hashes.md5.hexdigest() if hashes.md5 else None,
        )
        try:
            self._check(rf, result, hashes)
        except IntegrityError:
            part.unlink(missing_ok=True)
            state.unlink(missing_ok=True)
            raise
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        state.unlink(missing_ok=True)
        self.progress.file_done(rf.path)
        return result

    @staticmethod
    def _check(rf: RemoteFile, got: FileResult, hashes: _Hashes) -> None:
        problems = []
        if rf.size is not None and got.size != rf.size:
            problems.append(f"size {got.size}, expected {rf.size}")
        if rf.sha256 and got.sha256 != rf.sha256.lower():
            problems.append(f"sha256 {got.sha256}, expected {rf.sha256.lower()}")
        if rf.md5 and got.md5 != rf.md5.lower():
            problems.append(f"md5 {got.md5}, expected {rf.md5.lower()}")
        if rf.git_sha1 and hashes.sha1 is not None:
            sha1 = hashes.sha1.hexdigest()
            if sha1 != rf.git_sha1.lower():
                problems.append(f"git blob id {sha1}, expected {rf.git_sha1.lower()}")
        if problems:
            raise IntegrityError(
                f"{rf.path} failed verification ({'; '.join(problems)}); the download was discarded"
            )

    # single stream -------------------------------------------------------------------------

    def _single(self, rf: RemoteFile, part: Path, probe: Probe) -> _Hashes:
        """One plain GET, start to end: the server cannot resume, so a retry starts over."""
        holder: list[_Hashes] = []

        def once() -> None:
            hashes = _Hashes(probe.size, bool(rf.md5), bool(rf.git_sha1))
            self.progress.file_started(rf.path, probe.size, 0)
            with open(part, "wb") as f, self.client.stream("GET", rf.url, headers=rf.headers) as r:
                if r.status_code != 200:
                    raise _status_error(r, rf.url)
                got = 0
                for chunk in r.iter_raw():
                    if self.stop.is_set():
                        raise KeyboardInterrupt
                    f.write(chunk)
                    hashes.update(chunk)
                    got += len(chunk)
                    self.progress.advance(rf.path, len(chunk))
                if probe.size is not None and got < probe.size:
                    raise _Retryable(f"{rf.path}: connection closed at {got} of {probe.size}")
            holder[:] = [hashes]

        self._retrying(once)
        return holder[0]

    # segmented -----------------------------------------------------------------------------

    def _load_state(self, state: Path, probe: Probe) -> list[_Segment] | None:
        try:
            data = json.loads(state.read_text())
            if data["size"] != probe.size or data["validator"] != probe.validator:
                return None
            segs = [_Segment(int(s), int(e), int(d)) for s, e, d in data["segments"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        covered = 0
        for seg in segs:  # ranges must tile [0, size) in order
            if seg.start != covered or not 0 <= seg.done <= seg.end - seg.start:
                return None
            covered = seg.end
        return segs if covered == probe.size else None

    def _plan(self, size: int) -> list[_Segment]:
        n = max(1, min(self.connections, size // self.min_segment))
        bounds = [size * i // n for i in range(n + 1)]
        return [_Segment(bounds[i], bounds[i + 1]) for i in range(n)]

    def _segmented(self, rf: RemoteFile, part: Path, state: Path, probe: Probe) -> _Hashes:
        size = probe.size or 0
        segs = self._load_state(state, probe) if part.exists() else None
        if segs is None or part.stat().st_size != size:
            segs = self._plan(size)
            with open(part, "wb") as f:
                f.truncate(size)
                with contextlib.suppress(OSError):
                    os.posix_fallocate(f.fileno(), 0, size)
        already = sum(s.done for s in segs)
        if already:
            log.info("resuming %s at %d of %d bytes", rf.path, already, size)
        self.progress.file_started(rf.path, size, already)
        job = _Job(self, rf, part, probe, segs)
        return job.run(state)


class _Job:
    """One segmented download: worker threads fill ranges, the caller's thread hashes."""

    def __init__(
        self, dl: Downloader, rf: RemoteFile, part: Path, probe: Probe, segs: list[_Segment]
    ):
        self.dl, self.rf, self.probe, self.segs = dl, rf, probe, segs
        self.size = probe.size or 0
        self.fd = os.open(part, os.O_RDWR)
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.abort = threading.Event()

    def run(self, state: Path) -> _Hashes:
        workers = []
        try:
            for seg in list(self.segs):
                if seg.left:
                    workers.append(self._spawn(seg))
            return self._hash_along(state, workers)
        except BaseException:
            self.abort.set()
            raise
        finally:
            self.abort.set()
            deadline = time.monotonic() + 5
            for t in workers:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            with self.lock:  # a straggling worker checks `abort` under this lock before writing
                with contextlib.suppress(OSError):
                    self._save(state, locked=True)
                os.close(self.fd)

    def _spawn(self, seg: _Segment) -> threading.Thread:
        t = threading.Thread(target=self._worker, args=(seg,), daemon=True, name="llmhost-dl")
        t.start()
        return t

    # workers -------------------------------------------------------------------------------

    def _worker(self, seg: _Segment | None) -> None:
        try:
            while seg is not None and not self._stopped():
                self._fill(seg)
                seg = self._steal()
        except BaseException as exc:
            with self.wake:
                if self.error is None:
                    self.error = exc
                self.wake.notify_all()
        finally:
            with self.wake:
                self.wake.notify_all()

    def _stopped(self) -> bool:
        return self.abort.is_set() or self.dl.stop.is_set()

    def _fill(self, seg: _Segment) -> None:
        failures = 0
        while seg.left and not self._stopped():
            before = seg.done
            try:
                self._request(seg)
            except (httpx.TransportError, _Retryable) as exc:
                failures = 1 if seg.done > before else failures + 1
                self.dl._sleep_before_retry(failures, exc)

    def _request(self, seg: _Segment) -> None:
        rf = self.rf
        headers = {**rf.headers, "Range": f"bytes={seg.pos}-{seg.end - 1}"}
        if self.probe.validator:
            headers["If-Range"] = self.probe.validator
        with self.dl.client.stream("GET", rf.url, headers=headers) as r:
            if r.status_code == 200:
                raise _Changed()
            if r.status_code != 206:
                raise _status_error(r, rf.url)
            first = r.headers.get("content-range", "").split(" ")[-1].split("-")[0]
            if not first.isdigit() or int(first) != seg.pos:
                raise _Retryable(f"{rf.path}: server answered another range ({first})")
            if _content_range_total(r) not in (None, self.size):
                raise _Changed()
            for chunk in r.iter_raw():
                with self.wake:
                    if self.abort.is_set():
                        return
                    room = seg.left
                    if room and chunk:
                        data = chunk[:room]
                        os.pwrite(self.fd, data, seg.pos)
                        seg.done += len(data)
                        self.wake.notify_all()
                    if not seg.left:
                        break
                self.dl.progress.advance(rf.path, min(len(chunk), room))
                if self._stopped():
                    return
        if seg.left and not self._stopped():
            raise _Retryable(
                f"{rf.path}: connection closed with {seg.left} bytes of its range left"
            )

    def _steal(self) -> _Segment | None:
        """Split the largest range still left so an idle stream can help finish it."""
        with self.wake:
            if self._stopped():
                return None
            biggest = max(self.segs, key=lambda s: s.left)
            if biggest.left < 2 * self.dl.min_segment:
                return None
            mid = biggest.pos + biggest.left // 2
            new = _Segment(mid, biggest.end)
            biggest.end = mid
            self.segs.insert(self.segs.index(biggest) + 1, new)
            return new

    # the caller's thread ------------------------------------------------------------------

    def _front(self) -> int:
        for seg in self.segs:
            if seg.left:
                return seg.pos
        return self.size

    def _hash_along(self, state: Path, workers: list[threading.Thread]) -> _Hashes:
        hashes = _Hashes(self.size, bool(self.rf.md5), bool(self.rf.git_sha1))
        hashed = 0
        saved = time.monotonic()
        while True:
            with self.wake:
                front = self._front()
                if hashed >= front and front < self.size:
                    if self.error is not None:
                        raise self.error
                    if self.dl.stop.is_set():
                        raise KeyboardInterrupt
                    if not any(t.is_alive() for t in workers) and not self.error:
                        workers.extend(self._spawn(s) for s in self.segs if s.left)
                    self.wake.wait(0.25)
                    front = self._front()
            while hashed < front:
                data = os.pread(self.fd, min(_HASH_BLOCK, front - hashed), hashed)
                if not data:
                    raise DownloadError(f"{self.rf.path}: the partial file shrank")
                hashes.update(data)
                hashed += len(data)
            if time.monotonic() - saved > _SAVE_EVERY:
                self._save(state)
                saved = time.monotonic()
            if hashed >= self.size:
                if self.error is not None:
                    raise self.error
                return hashes

    def _save(self, state: Path, locked: bool = False) -> None:
        if locked:
            segs = [[s.start, s.end, s.done] for s in self.segs]
        else:
            with self.lock:
                segs = [[s.start, s.end, s.done] for s in self.segs]
        data = {
            "url": _display(self.rf.url),
            "size": self.size,
            "validator": self.probe.validator,
            "segments": segs,
        }
        tmp = state.with_name(state.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, state)
