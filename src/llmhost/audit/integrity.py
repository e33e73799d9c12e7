"""What anchors the audit chain outside its database: the audit key (records and purge anchors
are signed with HMAC-SHA256 under it) and the head checkpoint, a small signed file naming the
newest record and the purge anchor this host has seen, so a removed tail or a log replaced by
an older copy shows even though every remaining row still chains."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmhost.errors import IntegrityError
from llmhost.files import atomic_write

log = logging.getLogger("llmhost.audit")

CHECKPOINT_VERSION = 1
MAX_CHECKPOINT_BYTES = 4096
WRITE_EVERY_S = 1.0  # appends rewrite the checkpoint at most this often; close and purge always


def sign(key: bytes, label: str, *fields: object) -> str:
    """HMAC-SHA256 under the audit key of a labelled tuple (the label keeps a signature made
    for one purpose from being replayed as another)."""
    payload = json.dumps([label, *fields], sort_keys=True, ensure_ascii=False)
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Names a key without revealing it, so a log refuses records under a different key."""
    return sign(key, "key-id")[:16]


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Checkpoint:
    seq: int  # the newest record (the anchor's when the log is empty)
    hash: str
    anchor_seq: int  # the last record a purge removed (0: none yet)
    anchor_hash: str
    time: float = 0.0

    def _body(self) -> dict[str, object]:
        return {"v": CHECKPOINT_VERSION, **asdict(self)}

    def dump(self, key: bytes) -> bytes:
        body = self._body()
        return json.dumps({**body, "mac": sign(key, "checkpoint", body)}, indent=1).encode()

    @staticmethod
    def read(path: Path) -> bytes | None:
        """The checkpoint file's bytes (bounded), None when there is none."""
        try:
            with path.open("rb") as f:
                return f.read(MAX_CHECKPOINT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IntegrityError(f"cannot read the audit head checkpoint {path}: {exc}") from exc

    @classmethod
    def load(cls, path: Path, key: bytes, raw: bytes | None = b"") -> Checkpoint | None:
        """The checkpoint at `path` (or in `raw`, read from it before), None when there is
        none; IntegrityError when it is not one this key signed."""
        if raw == b"":
            raw = cls.read(path)
        if raw is None:
            return None
        try:
            if len(raw) > MAX_CHECKPOINT_BYTES:
                raise ValueError("too large")
            data = json.loads(raw)
            mac = data.pop("mac")
            if data.pop("v") != CHECKPOINT_VERSION:
                raise ValueError("unknown version")
            cp = cls(
                seq=int(data["seq"]),
                hash=str(data["hash"]),
                anchor_seq=int(data["anchor_seq"]),
                anchor_hash=str(data["anchor_hash"]),
                time=float(data["time"]),
            )
            ok = isinstance(mac, str) and same(mac, sign(key, "checkpoint", cp._body()))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(
                f"the audit head checkpoint {path} is unreadable ({exc})", code="bad_checkpoint"
            ) from exc
        if not ok:
            raise IntegrityError(
                f"the audit head checkpoint {path} is not signed by the audit key "
                "(forged, or written under another key)",
                code="bad_checkpoint",
            )
        return cp


class HeadFile:
    """Writes the head checkpoint after appends (at most every `every` seconds, the newest
    one always written in the end, by a timer or by `close`) and at once after a purge."""

    def __init__(self, path: Path, every: float = WRITE_EVERY_S):
        self.path = path
        self.every = every
        self._lock = threading.Lock()
        self._pending: tuple[bytes, Checkpoint] | None = None
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False

    def offer(self, key: bytes, cp: Checkpoint, *, now: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending = (key, cp)
            wait = self._last + self.every - time.monotonic()
            if now or wait <= 0:
                self._write_pending()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def close(self) -> None:
        with self._lock:
            self._write_pending()
            self._closed = True

    def _write_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending is None:
            return
        key, cp = self._pending
        self._pending = None
        stamped = Checkpoint(cp.seq, cp.hash, cp.anchor_seq, cp.anchor_hash, time.time())
        try:
            atomic_write(self.path, stamped.dump(key), private=True)
        except OSError as exc:
            # the records are committed: raising would make the writer append them twice;
            # the next append tries again
            log.error("cannot write the audit head checkpoint %s: %s", self.path, exc)
            return
        self._last = time.monotonic()
