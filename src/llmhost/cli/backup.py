"""`llmhost backup`: full and incremental backups of config, keys, audit log and models."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from llmhost.config import load_settings
from llmhost.errors import BackupError, ConfigError

backup_app = typer.Typer(
    help="Back up and restore config, keys, audit log and models.", no_args_is_help=True
)
DEST_HELP = "Backup folder or s3://bucket/prefix [$LLMHOST_HOME/backups]."
KEY_HELP = "Encrypt with (or read with) this key file (the model key, 0600)."
KEY_COMMAND_HELP = "Command printing the key."


def _backups(to: str | None, key_file: Path | None, key_command: str | None = None):
    """The backups, and for an s3:// destination the bucket whose local cache they use."""
    import os

    from llmhost.ops.backup import Backups
    from llmhost.ops.backup_remote import S3Remote
    from llmhost.store import crypto

    settings = load_settings()
    key = crypto.load_key(key_file, key_command) if (key_file or key_command) else None
    remote = None
    if to is not None and to.startswith("s3://"):
        remote = S3Remote(to, dict(os.environ))
        dest = settings.home / "backups" / ".s3" / remote.bucket / remote.prefix
        remote.sync_records(dest)
    else:
        dest = Path(to).expanduser() if to else settings.home / "backups"
    return Backups(settings.home, dest, key, settings.backup_key_path), settings, remote


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


@backup_app.command()
def create(
    full: bool = typer.Option(False, "--full", help="Everything (the default)."),
    incremental: bool = typer.Option(False, "--incremental", help="State changed since the last."),
    to: str | None = typer.Option(None, help=DEST_HELP),
    key_file: Path | None = typer.Option(None, help=KEY_HELP),
    key_command: str | None = typer.Option(None, help=KEY_COMMAND_HELP),
) -> None:
    """Back up config.toml, keys.db, audit.db (consistent copies of the live databases) and
    every stored model (files kept once across backups, by sha256)."""
    if full and incremental:
        raise ConfigError("--full or --incremental, not both")
    b, settings, remote = _backups(to, key_file, key_command)
    if remote is not None:
        b.known_blobs = {k.rsplit("/", 1)[-1] for k in remote.list_keys("blobs/")}
    if settings.audit_url:
        Console(stderr=True).print(
            "[yellow]The audit log is in PostgreSQL: back it up with pg_dump.[/]"
        )
    info = b.create("incremental" if incremental else "full")
    if remote is not None:
        remote.push(b.dest, b.new_files)
    for note in info.notes:
        Console(stderr=True).print(f"[yellow]{note}[/]", highlight=False)
    typer.echo(info.id)
    Console(stderr=True).print(
        f"{info.kind}: {len(info.included)} state files, "
        f"{sum(not r.endswith('.manifest.json') for r in info.models)} model files, "
        f"archive {_size(info.archive_size)}{' (encrypted)' if info.encrypted else ''} "
        f"in {b.dest}",
        highlight=False,
    )


@backup_app.command("list")
def list_cmd(
    to: str | None = typer.Option(None, help=DEST_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Backups, oldest first."""
    b, _, _ = _backups(to, None)
    items = b.list()
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in items]))
        return
    table = Table("id", "kind", "created", "state files", "models", "archive", "encrypted")
    for i in items:
        n_models = sum(r.endswith(".manifest.json") for r in i.models)
        table.add_row(
            i.id,
            i.kind,
            datetime.fromtimestamp(i.created).isoformat(" ", "seconds"),
            ", ".join(i.included) or "-",
            str(n_models),
            _size(i.archive_size),
            "yes" if i.encrypted else "no",
        )
    Console().print(table)


@backup_app.command()
def verify(
    backup_id: str | None = typer.Argument(None, help="A backup id [all]."),
    to: str | None = typer.Option(None, help=DEST_HELP),
    key_file: Path | None = typer.Option(None, help=KEY_HELP),
    key_command: str | None = typer.Option(None, help=KEY_COMMAND_HELP),
) -> None:
    """Check archives and model blobs against their recorded sha256; exit 1 on any problem."""
    b, _, remote = _backups(to, key_file, key_command)
    items = [b.get(backup_id)] if backup_id else b.list()
    if remote is not None:
        remote.pull(b.dest, b.referenced(items))
    if not items:
        raise BackupError(f"no backups in {b.dest}")
    bad = 0
    for info in items:
        problems = b.verify(info)
        if problems:
            bad += 1
            for p in problems:
                typer.echo(f"{info.id}: {p}")
        else:
            typer.echo(f"{info.id}: ok")
    if bad:
        raise BackupError(f"{bad} of {len(items)} backups are damaged")


@backup_app.command()
def restore(
    backup_id: str | None = typer.Argument(None, help="A backup id [the newest]."),
    to: str | None = typer.Option(None, help=DEST_HELP),
    home: Path | None = typer.Option(None, help="Restore into this home [$LLMHOST_HOME]."),
    force: bool = typer.Option(False, "--force", help="Replace the state the home has."),
    key_file: Path | None = typer.Option(None, help=KEY_HELP),
    key_command: str | None = typer.Option(None, help=KEY_COMMAND_HELP),
) -> None:
    """Rebuild the home as it was at a backup (its full backup, then its incrementals);
    every file is checked against its sha256 before anything is replaced."""
    b, settings, remote = _backups(to, key_file, key_command)
    info = b.get(backup_id)
    if remote is not None:
        remote.pull(b.dest, b.referenced(b.chain(info)))
    done = b.restore(info, (home or settings.home).expanduser(), force=force)
    typer.echo(f"restored {info.id}: {len(done)} items")


@backup_app.command()
def prune(
    keep: int = typer.Option(..., "--keep", min=1, help="Full backups to keep (newest)."),
    to: str | None = typer.Option(None, help=DEST_HELP),
) -> None:
    """Remove all but the newest N full backups (with their incrementals) and unused blobs."""
    b, _, remote = _backups(to, None)
    for removed in b.prune(keep):
        typer.echo(f"removed {removed}")
    if remote is not None:
        kept = b.referenced(b.list())
        remote.delete(
            {k for k in remote.list_keys() if k.startswith(("llmhost-", "blobs/"))} - kept
        )


@backup_app.command()
def schedule(
    hour: int = typer.Option(2, help="Hour of the daily full backup (local time)."),
    keep: int = typer.Option(7, min=1, help="Full backups to keep."),
    to: str | None = typer.Option(None, help=DEST_HELP),
    out: Path | None = typer.Option(
        None, help="Write the systemd units here (e.g. /etc/systemd/system) [print them]."
    ),
    cron: bool = typer.Option(False, "--cron", help="Print a crontab line instead."),
) -> None:
    """A daily full backup with pruning, as a systemd timer or a cron line."""
    from llmhost.ops.backup_remote import schedule_units

    settings = load_settings()
    exe = shutil.which("llmhost") or f"{sys.executable} -m llmhost"
    units = schedule_units(hour, keep, exe, settings.home, to or str(settings.home / "backups"))
    if cron:
        typer.echo(units["cron"])
        return
    for name in ("llmhost-backup.service", "llmhost-backup.timer"):
        if out is None:
            typer.echo(f"# {name}\n{units[name]}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(units[name])
            typer.echo(str(out / name))
    if out is not None:
        Console(stderr=True).print(
            "Enable with: systemctl daemon-reload && systemctl enable --now llmhost-backup.timer"
        )
