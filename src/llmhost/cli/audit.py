"""`llmhost audit search|verify|purge|export`: the per-request audit log."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmhost.cli.options import duration_flag
from llmhost.config import load_settings
from llmhost.durations import parse_duration
from llmhost.errors import ConfigError, IntegrityError
from llmhost.files import open_private

audit_app = typer.Typer(
    help="Search, verify, purge and export the audit log.", no_args_is_help=True
)
CELL_CHARS = 60  # a table cell shows this much of a stored value; --json gives it all
# bidirectional overrides and isolates reorder what a terminal shows ("Trojan Source")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def parse_when(text: str | None) -> float | None:
    """An ISO date/time (UTC unless it says otherwise) or a duration ago (`7d`, `7d ago`)."""
    if text is None:
        return None
    words = text.split()
    ago = bool(words) and words[-1].lower() == "ago"
    with contextlib.suppress(ValueError):  # else an ISO time
        spoken = "".join(words[:-1] if ago else words)
        return time.time() - parse_duration(spoken, unit_required=True)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"bad time {text!r}: use 2026-11-01, 2026-11-01T12:00, 7d or 7d ago"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _store():
    from llmhost.audit.store import open_store

    settings = load_settings()
    if not settings.audit_url and not settings.audit_db.exists():
        raise ConfigError(f"no audit log at {settings.audit_db}")
    return open_store(
        settings.audit_url,
        settings.audit_db,
        key_file=settings.audit_key_path,
        head_file=settings.audit_head_path,
    )


def visible(text: str | None, limit: int = CELL_CHARS) -> str:
    """Stored text as a terminal may show it: at most `limit` characters, and control,
    line-breaking and bidi characters written as escapes (`\\x1b`), so a value can neither
    drive the operator's terminal nor disguise itself."""
    text = text or ""
    cut = len(text) > limit
    out = []
    for c in text[:limit]:
        o = ord(c)
        if c in _SHORT:
            out.append(_SHORT[c])
        elif o < 0x20 or 0x7F <= o < 0xA0 or c in _BIDI or c in "\u2028\u2029":
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out) + ("…" if cut else "")


def csv_cell(value: object) -> object:
    """A text cell a spreadsheet would take for a formula gets a leading quote (OWASP)."""
    if isinstance(value, str) and value.startswith(_CSV_FORMULA):
        return "'" + value
    return value


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _write(records, fmt: str, out) -> None:
    rows = [{**asdict(r), "time": _iso(r.ts)} for r in records]
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        fields = ["time", *(k for k in (rows[0] if rows else {}) if k != "time")]
        w = csv.DictWriter(out, fieldnames=fields or ["time"])
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)


@audit_app.command()
def search(
    user: str | None = typer.Option(None, "--user", help="User id."),
    since: str | None = typer.Option(None, help="From (ISO time or e.g. 7d ago)."),
    until: str | None = typer.Option(None, help="Until (ISO time or e.g. 1h ago)."),
    model: str | None = typer.Option(None),
    status: int | None = typer.Option(None, min=100, max=599, help="HTTP status."),
    limit: int = typer.Option(1000, min=1),
    as_json: bool = typer.Option(False, "--json", help="JSON lines."),
    as_csv: bool = typer.Option(False, "--csv"),
) -> None:
    """Find records by user, time, model or status."""
    store = _store()
    found = store.search(
        user=user,
        since=parse_when(since),
        until=parse_when(until),
        model=model,
        status=status,
        limit=limit,
    )
    if as_json or as_csv:
        _write(found, "json" if as_json else "csv", sys.stdout)
        return
    table = Table("TIME", "CLIENT", "USER", "STATUS", "MODEL", "PROMPT", "CHARS", "MS")
    for r in found:
        # Text, not markup: stored values are shown as they are, never interpreted
        table.add_row(
            _iso(r.ts),
            Text(visible(r.client_ip)),
            Text(visible(r.user_id)),
            str(r.status),
            Text(visible(r.model)),
            Text(visible(r.prompt)),
            str(r.response_length),
            f"{r.latency_ms:.0f}",
        )
    Console().print(table)
    Console(stderr=True).print(f"{len(found)} records", highlight=False)


@audit_app.command()
def verify() -> None:
    """Check the chain under the audit key and against the signed head checkpoint: any edited,
    deleted, inserted or recomputed record, a removed tail or a moved anchor is reported."""
    report = _store().verify()
    if not report.ok:
        raise IntegrityError(f"audit chain broken after {report.checked} records: {report.problem}")
    typer.echo(f"ok: {report.checked} records, chain intact")


@audit_app.command()
def seal() -> None:
    """Take over a log written by an older llmhost (no audit key): check its chain once, then
    sign its head so new records follow it under the key."""
    report = _store().seal()
    typer.echo(f"sealed: {report.checked} older records, signed under the audit key")


@audit_app.command()
def purge(older_than: str = typer.Option("90d", help="Retention, e.g. 90d.")) -> None:
    """Remove records past the retention (the server also does this daily)."""
    n = _store().purge(duration_flag(older_than, "--older-than"))
    typer.echo(f"removed {n} records older than {older_than}")


@audit_app.command()
def export(
    out: Path | None = typer.Option(None, help="File to write [stdout]."),
    fmt: str = typer.Option("json", "--format", help="json (lines) or csv."),
    since: str | None = typer.Option(None),
    until: str | None = typer.Option(None),
) -> None:
    """Export records (for a SIEM or an archive)."""
    if fmt not in ("json", "csv"):
        raise ConfigError("--format is json or csv")
    found = _store().search(since=parse_when(since), until=parse_when(until))
    if out is None:
        _write(found, fmt, sys.stdout)
        return
    with open_private(out, "w", newline="") as f:  # prompts: for the owner only
        _write(found, fmt, f)
    typer.echo(f"exported {len(found)} records to {out}")
