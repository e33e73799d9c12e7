"""Checking the audit chain: a snapshot of the log (its meta table and rows) walked under the
audit key from the signed purge anchor to the newest record, then held against the signed head
checkpoint. The store takes the snapshot; this module only reads it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmhost.audit.integrity import Checkpoint, key_id, same, sign
from llmhost.audit.records import (
    COLUMNS,
    FIELDS,
    GENESIS,
    AuditRecord,
    ChainReport,
    StoredRecord,
    chain_hash,
)
from llmhost.errors import IntegrityError

SCHEME = "hmac-sha256"
LEGACY_MESSAGE = (
    "the audit log was written without the audit key (by an older llmhost); check it and sign "
    "its head with `llmhost audit seal`, or move it aside to start a new log"
)


def gone_message(head_file: Path) -> str:
    return (
        f"the audit log is new and empty, but the head checkpoint {head_file} "
        "remains from a log written before: that log was deleted or replaced (to start a "
        "new log on purpose, move the checkpoint aside too)"
    )


def walk(
    rows: Sequence[Sequence[Any]],
    prev: str,
    expect: int,
    key_for: Callable[[int], bytes | None],
    boundary: tuple[int, str] | None,
    key_file: Path | None = None,
) -> tuple[ChainReport, int, str]:
    """Check rows in order from (expect, prev); returns the report and the last record."""
    checked = 0
    for row in rows:
        rec = StoredRecord(**dict(zip(COLUMNS, row, strict=True)))
        if rec.seq != expect:
            return ChainReport(False, checked, f"record {expect} is missing", expect), 0, ""
        if rec.prev_hash != prev:
            problem = f"record {rec.seq} does not follow its predecessor"
            return ChainReport(False, checked, problem, rec.seq), 0, ""
        base = AuditRecord(**{k: getattr(rec, k) for k in FIELDS})
        key = key_for(rec.seq)
        if not same(chain_hash(prev, rec.seq, base, key=key), rec.hash):
            problem = f"record {rec.seq} was modified"
            if checked == 0 and key is not None:
                problem += f" (or {key_file} is not the key it was written with)"
            return ChainReport(False, checked, problem, rec.seq), 0, ""
        if boundary is not None and rec.seq == boundary[0] and not same(rec.hash, boundary[1]):
            problem = f"record {rec.seq} differs from the sealed head of the older log"
            return ChainReport(False, checked, problem, rec.seq), 0, ""
        prev, expect = rec.hash, expect + 1
        checked += 1
    return ChainReport(True, checked), expect - 1, prev


def check(
    meta: dict[str, str],
    rows: Sequence[Sequence[Any]],
    raw_cp: bytes | None,
    key: Callable[[], bytes],
    key_file: Path,
    head_file: Path,
) -> ChainReport:
    """A snapshot of the log (its meta table and its rows, oldest first) checked under the
    audit key (`key()` loads it) from the signed purge anchor to the newest record, then
    against the head checkpoint read before the snapshot (`raw_cp`)."""
    anchor_seq = int(meta.get("anchor_seq", "0"))
    anchor_hash = meta.get("anchor_hash", GENESIS)
    if "scheme" not in meta:
        report, _, _ = walk(rows, anchor_hash, anchor_seq + 1, lambda _: None, None, key_file)
        if not report.ok:
            return report
        if not rows and "anchor_seq" not in meta:  # a new, empty log...
            if raw_cp is not None:  # ...where there was one before
                return ChainReport(False, 0, gone_message(head_file))
            return report
        return ChainReport(False, report.checked, LEGACY_MESSAGE)
    key_bytes = key()
    if not same(meta.get("key_id", ""), key_id(key_bytes)):
        problem = f"{key_file} is not the key this audit log is written with"
        return ChainReport(False, 0, problem)
    if anchor_seq and not same(
        meta.get("anchor_mac", ""), sign(key_bytes, "anchor", anchor_seq, anchor_hash)
    ):
        problem = (
            f"the purge anchor (record {anchor_seq}) is not signed by the audit key: "
            "records were removed from the start of the log"
        )
        return ChainReport(False, 0, problem, anchor_seq)
    legacy_seq = int(meta.get("legacy_seq", "0"))
    boundary = None
    if "legacy_seq" in meta:
        boundary = (legacy_seq, meta.get("legacy_hash", ""))
        if not same(meta.get("legacy_mac", ""), sign(key_bytes, "legacy", *boundary)):
            problem = "the sealed head of the older log is not signed by the audit key"
            return ChainReport(False, 0, problem, legacy_seq)
        if anchor_seq == legacy_seq and not same(anchor_hash, boundary[1]):
            problem = "the purge anchor differs from the sealed head of the older log"
            return ChainReport(False, 0, problem, anchor_seq)

    def key_for(seq: int) -> bytes | None:
        return None if seq <= legacy_seq else key_bytes

    report, last, last_hash = walk(rows, anchor_hash, anchor_seq + 1, key_for, boundary, key_file)
    if not report.ok:
        return report
    if not rows:
        last, last_hash = anchor_seq, anchor_hash
    head = (last, last_hash, anchor_seq, anchor_hash)
    return against_checkpoint(report, key_bytes, raw_cp, head_file, rows, *head)


def against_checkpoint(
    report: ChainReport,
    key: bytes,
    raw_cp: bytes | None,
    head_file: Path,
    rows: Sequence[Sequence[Any]],
    last: int,
    last_hash: str,
    a_seq: int,
    a_hash: str,
) -> ChainReport:
    n = report.checked
    try:
        cp = Checkpoint.load(head_file, key, raw_cp)
    except IntegrityError as exc:
        return ChainReport(False, n, exc.message)
    if cp is None:
        if last == 0:
            return report
        problem = (
            f"no head checkpoint at {head_file}: records removed from the end of the "
            "log could not be detected"
        )
        return ChainReport(False, n, problem)
    if cp.anchor_seq > a_seq or (cp.anchor_seq == a_seq and not same(cp.anchor_hash, a_hash)):
        problem = (
            f"the purge anchor is at record {a_seq} but the head checkpoint has it at "
            f"{cp.anchor_seq}: the log was replaced by another copy"
        )
        return ChainReport(False, n, problem, a_seq)
    if cp.seq > last:
        first = last + 1
        gone = f"record {first} was" if cp.seq == first else f"records {first}-{cp.seq} were"
        problem = f"{gone} removed from the end of the log (the head checkpoint names {cp.seq})"
        return ChainReport(False, n, problem, last + 1)
    if cp.seq > a_seq:
        # the rows were walked without a gap from the anchor on: the one it names is here
        at = rows[cp.seq - a_seq - 1][COLUMNS.index("hash")]
        if not same(at, cp.hash):
            problem = f"record {cp.seq} differs from the head checkpoint: the log was rewritten"
            return ChainReport(False, n, problem, cp.seq)
    elif cp.seq == a_seq and not same(cp.hash, a_hash):
        problem = "the purge anchor differs from the head checkpoint: the log was rewritten"
        return ChainReport(False, n, problem, cp.seq)
    return report
