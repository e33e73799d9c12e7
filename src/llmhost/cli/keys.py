"""`llmhost keys create|list|revoke|rotate`: API keys, stored hashed in `$LLMHOST_HOME/keys.db`.
Each change is an audit record, as one made through the API is: who ran it (the system user,
as `cli:<name>`), when, and what it did to which key."""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from llmhost.cli.options import AsJson, duration_flag
from llmhost.config import QUOTA_NOTE, load_settings
from llmhost.errors import LlmhostError

if TYPE_CHECKING:
    from llmhost.security.auth import KeyInfo

keys_app = typer.Typer(help="Create, list, revoke and rotate API keys.", no_args_is_help=True)


def _store():
    from llmhost.security.auth import KeyStore

    return contextlib.closing(KeyStore(load_settings().keys_db))


def _audit(action: str, t0: float) -> None:
    """An audit record of a key change made from this shell (when the audit log is on). A
    record that cannot be written is an error: the change is done, and the exit says so."""
    import getpass
    import secrets

    from llmhost.audit.records import AuditRecord
    from llmhost.audit.store import open_store

    settings = load_settings()
    if not settings.audit:
        return
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container, say)
        who = str(os.getuid())
    record = AuditRecord(
        ts=t0,
        request_id="cli-" + secrets.token_hex(8),
        client_ip="local",
        user_id=f"cli:{who}",
        route=f"llmhost keys {action}",
        status=200,
        latency_ms=(time.time() - t0) * 1000,
    )
    try:
        store = open_store(
            settings.audit_url,
            settings.audit_db,
            key_file=settings.audit_key_path,
            head_file=settings.audit_head_path,
            writer=True,
        )
        try:
            store.append([record])
        finally:
            store.close()
    except Exception as exc:  # the store's ConfigError, sqlite3's or psycopg's errors
        detail = exc.message if isinstance(exc, LlmhostError) else str(exc)
        raise LlmhostError(
            f"done, but its audit record could not be written ({detail[:300]}): "
            f"record `{record.route}` by {record.user_id} by hand"
        ) from exc


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@keys_app.command()
def create(
    user: str = typer.Option(..., "--user", help="User id the key acts as."),
    role: str = typer.Option("user", help="user or admin."),
    expires: str | None = typer.Option(None, help="Lifetime, e.g. 30d or 12h [never]."),
    rpm: int | None = typer.Option(None, min=1, help="Requests per minute for this key."),
    tpm: int | None = typer.Option(None, min=1, help="Tokens per minute for this key."),
    models: str | None = typer.Option(
        None, help="Comma-separated model ids the key may use [all the server serves]."
    ),
    tokens_per_day: int | None = typer.Option(
        None, min=0, help=f"Tokens per UTC day for this key ({QUOTA_NOTE})."
    ),
    tokens_per_month: int | None = typer.Option(
        None, min=0, help=f"Tokens per UTC calendar month for this key ({QUOTA_NOTE})."
    ),
    requests_per_day: int | None = typer.Option(
        None, min=0, help=f"Requests per UTC day for this key ({QUOTA_NOTE})."
    ),
) -> None:
    """Create a key. It is printed once: only its hash is stored."""
    from llmhost.security.quota import Quota

    lifetime = duration_flag(expires, "--expires") if expires else None
    t0 = time.time()
    with _store() as keys:
        text, info = keys.create(
            user,
            role,
            expires_in=lifetime,
            rpm=rpm,
            tpm=tpm,
            models=models.split(",") if models is not None else None,
            quota=Quota(tokens_per_day, tokens_per_month, requests_per_day),
        )
    typer.echo(text)
    Console(stderr=True, highlight=False).print(
        f"key {info.key_id} for {info.user_id} ({info.role}), expires {_when(info.expires)}. "
        "Store it now: it cannot be shown again."
    )
    _audit(f"create {info.key_id} (user {info.user_id}, role {info.role})", t0)


def _state(k: KeyInfo) -> str:
    state = k.state()
    if state == "active" and k.in_grace():
        return f"active; old secret until {_when(k.old_secret_until)}"
    return state


@keys_app.command("list")
def list_keys(as_json: AsJson = False) -> None:
    """Keys with their owner, role, limits and state (never the secret)."""
    with _store() as keys:
        found = keys.list()
    if as_json:
        out = [{**vars(k), "quota": vars(k.quota), "state": k.state()} for k in found]
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table("ID", "USER", "ROLE", "STATE", "CREATED", "EXPIRES", "RPM", "TPM", "MODELS")
    for k in found:
        table.add_row(
            k.key_id,
            k.user_id,
            k.role,
            _state(k),
            _when(k.created),
            _when(k.expires),
            str(k.rpm or ""),
            str(k.tpm or ""),
            ", ".join(k.models) if k.models is not None else "all",
        )
    Console().print(table)


@keys_app.command()
def revoke(key_id: str = typer.Argument(..., help="The key's id (see `llmhost keys list`).")):
    """Revoke a key: requests with it fail at once."""
    t0 = time.time()
    with _store() as keys:
        info = keys.revoke(key_id)
    typer.echo(f"revoked {info.key_id} ({info.user_id})")
    _audit(f"revoke {info.key_id} (user {info.user_id})", t0)


@keys_app.command()
def rotate(
    key_id: str = typer.Argument(..., help="The key's id (see `llmhost keys list`)."),
    grace: str = typer.Option(
        ..., help="How long the old secret keeps working, e.g. 24h; 0 ends it now."
    ),
) -> None:
    """Give a key a new secret, printed once; the old one works for the grace period.
    The key keeps its id, user, role, limits, models and expiry."""
    seconds = 0.0 if grace.strip() == "0" else duration_flag(grace, "--grace")
    t0 = time.time()
    with _store() as keys:
        done = keys.rotate(key_id, seconds)
    typer.echo(done.key)
    info = done.info
    ends = (
        f"works until {_when(info.old_secret_until)}"
        if info.old_secret_until is not None
        else "stopped working now"
    )
    err = Console(stderr=True, highlight=False)
    err.print(
        f"key {info.key_id} for {info.user_id} rotated: its old secret {ends}. "
        "Store the new one now: it cannot be shown again."
    )
    if done.cut_short:
        err.print(
            "The secret an earlier rotation replaced was still in its grace: it stops now too."
        )
    _audit(f"rotate {info.key_id} (user {info.user_id}, grace {seconds:g} s)", t0)
