"""One audit record, as written and as stored, and the chain hash that links each to the one
before it."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, fields

GENESIS = "0" * 64


@dataclass
class AuditRecord:
    """The guide's fields (timestamp, client IP, user id, prompt, response length, latency)
    plus request id, model, route, status and token counts."""

    ts: float
    request_id: str
    client_ip: str
    user_id: str
    route: str
    status: int
    model: str = ""
    prompt: str | None = None  # as the prompt mode stores it: redacted, full, hash or none
    response_length: int = 0  # characters of generated text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0

    def line(self) -> str:
        """The guide's layout:
        [TIMESTAMP] [CLIENT_IP] [USER_ID] [PROMPT] [RESPONSE_LENGTH] [LATENCY]"""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts))
        stamp += f".{int(self.ts % 1 * 1000):03d}Z"
        prompt = json.dumps(self.prompt if self.prompt is not None else "", ensure_ascii=False)
        return (
            f"[{stamp}] [{self.client_ip}] [{self.user_id}] [{prompt}] "
            f"[{self.response_length}] [{self.latency_ms:.0f}ms]"
        )


FIELDS = [f.name for f in fields(AuditRecord)]


@dataclass
class StoredRecord(AuditRecord):
    seq: int = 0
    prev_hash: str = GENESIS
    hash: str = ""


def chain_hash(prev: str, seq: int, rec: AuditRecord, *, key: bytes | None) -> str:
    """HMAC-SHA256 under the audit key; `key=None` is the unkeyed sha256 of logs written
    before records were keyed (only ever checked up to their sealed head)."""
    body = {k: getattr(rec, k) for k in FIELDS}
    body["ts"] = repr(float(rec.ts))
    body["latency_ms"] = repr(float(rec.latency_ms))
    payload = json.dumps([prev, seq, body], sort_keys=True, ensure_ascii=False).encode()
    if key is None:
        return hashlib.sha256(payload).hexdigest()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


@dataclass
class ChainReport:
    ok: bool
    checked: int
    problem: str | None = None
    seq: int | None = None


COLUMNS = ["seq", *FIELDS, "prev_hash", "hash"]
