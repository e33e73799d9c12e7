"""`llmhost pull`, `verify`, `list`, `show`, `rm`, `tag`, `promote`: the local model store."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from llmhost.cli.options import AsJson
from llmhost.config import load_settings
from llmhost.errors import ConfigError, IntegrityError
from llmhost.store.download import DEFAULT_CONNECTIONS

err = Console(stderr=True, highlight=False)


def _store():
    from llmhost.store.registry import ModelStore

    return ModelStore(load_settings().models_dir)


class RichProgress:
    """A bar per file and one for the whole pull; called from the download threads."""

    def __init__(self, progress: Progress, total: int | None):
        self.progress = progress
        self.total = progress.add_task("[bold]total", total=total or None)
        self.tasks: dict[str, TaskID] = {}

    def file_started(self, path: str, total: int | None, done: int) -> None:
        if path not in self.tasks:
            self.tasks[path] = self.progress.add_task(path, total=total)
            self.progress.advance(self.total, done)
        self.progress.update(self.tasks[path], total=total, completed=done)

    def advance(self, path: str, n: int) -> None:
        self.progress.advance(self.tasks[path], n)
        self.progress.advance(self.total, n)

    def file_done(self, path: str) -> None:
        task = self.tasks.get(path)
        if task is not None:
            self.progress.update(task, visible=False)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def pull(
    source: str = typer.Argument(
        ..., help="URL, s3://bucket/prefix, Hugging Face org/repo, or a file listing URLs."
    ),
    name: str | None = typer.Option(None, "--name", help="Store as name:tag."),
    revision: str | None = typer.Option(None, help="Hugging Face branch, tag or commit."),
    include: list[str] = typer.Option([], "--include", help="Only files matching a glob."),
    sha256: str | None = typer.Option(None, help="Expected sha256 of a single-URL file."),
    connections: int = typer.Option(DEFAULT_CONNECTIONS, "--connections", "-x", min=1, max=64),
    allow_pickle: bool = typer.Option(False, help="Accept pickle (.bin/.pt) weights."),
    force: bool = typer.Option(False, help="Replace an existing name:tag."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Download a model into the store: parallel ranges, resumable (run the same command
    again after an interruption), every file checked before the model is registered."""
    from llmhost.store.download import Downloader
    from llmhost.store.pull import execute, plan
    from llmhost.store.sources import SourceOptions

    _sigterm_as_interrupt()
    store = _store()
    opts = SourceOptions(
        revision=revision, include=include, sha256=sha256, allow_pickle=allow_pickle
    )
    stop = threading.Event()
    with Downloader(connections=connections, stop=stop) as dl:
        p = plan(store, source, name=name, opts=opts, downloader=dl, force=force)
        for note in p.resolved.notes:
            err.print(f"[dim]{note}[/]")
        total = sum(r.size for r in p.done.values()) + sum(pr.size or 0 for _, pr in p.pending)
        bars = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=quiet,
            transient=False,
        )
        try:
            with bars:
                sink = RichProgress(bars, total)
                bars.advance(sink.total, sum(r.size for r in p.done.values()))
                dl.progress = sink
                manifest = execute(store, p, downloader=dl, allow_pickle=allow_pickle, force=force)
        except KeyboardInterrupt:
            stop.set()
            err.print("[yellow]interrupted[/]: run the same command again to resume")
            raise typer.Exit(130) from None
    typer.echo(
        f"pulled {manifest.ref}: {len(manifest.files)} files, {_human(manifest.size)}, "
        f"format {manifest.format}"
    )


def list_models(as_json: AsJson = False) -> None:
    """The models in the store."""
    models = _store().list()
    if as_json:
        typer.echo(json.dumps([json.loads(m.model_dump_json()) for m in models], indent=2))
        return
    table = Table("NAME", "FORMAT", "SIZE", "CHANNEL", "ENCRYPTED", "CREATED", "SOURCE")
    for m in models:
        table.add_row(
            m.ref,
            m.format,
            _human(m.size),
            m.channel or "",
            "yes" if m.encrypted else "",
            m.created.strftime("%Y-%m-%d %H:%M"),
            m.source,
        )
    Console().print(table)


def show(ref: str = typer.Argument(..., help="name:tag")) -> None:
    """A model's manifest."""
    from llmhost.store.names import parse_ref

    store = _store()
    manifest = store.get(ref)
    out = json.loads(manifest.model_dump_json())
    out["path"] = str(store.version_dir(parse_ref(ref)))
    typer.echo(json.dumps(out, indent=2))


def rm(ref: str = typer.Argument(..., help="name:tag")) -> None:
    """Remove a model version from the store."""
    manifest = _store().remove(ref)
    typer.echo(f"removed {manifest.ref} ({_human(manifest.size)})")


def tag(
    src: str = typer.Argument(..., help="Existing name:tag."),
    dst: str = typer.Argument(..., help="New name:tag."),
    force: bool = typer.Option(False, help="Replace an existing destination."),
) -> None:
    """Give a model version another name:tag (hard links; no extra disk)."""
    new = _store().tag(src, dst, force=force)
    typer.echo(f"tagged {src} as {new.ref}")


def promote(
    ref: str = typer.Argument(..., help="name:tag"),
    channel: str = typer.Option("stable", help="Channel to put it on."),
) -> None:
    """Put a version on a channel; `llmhost serve NAME@CHANNEL` serves it."""
    m = _store().promote(ref, channel)
    typer.echo(f"{m.ref} is now on channel {channel}")


def verify(
    target: str = typer.Argument(..., help="name:tag, a model folder or a file."),
    checksums: Path | None = typer.Option(
        None, "--checksums", help="A SHA256SUMS or md5sum file to check against."
    ),
    allow_pickle: bool = typer.Option(False, help="Accept pickle (.bin/.pt) weights."),
    as_json: AsJson = False,
) -> None:
    """Check checksums (manifest or a checksum file) and the model's layout."""
    from llmhost.store.manifest import MANIFEST_NAME, read_manifest
    from llmhost.store.verify import read_checksum_file, verify_file, verify_folder

    store = _store()
    path = store.resolve(target)
    sums = None
    if checksums is not None:
        try:
            sums = read_checksum_file(checksums)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {checksums}: {exc}") from exc
    manifest = None
    started_ns = time.time_ns()
    if path.is_dir():
        manifest = read_manifest(path) if (path / MANIFEST_NAME).is_file() else None
        if manifest is None and sums is None:
            err.print("[dim]no manifest or --checksums: checking the layout only[/]")
        report = verify_folder(path, manifest, sums, allow_pickle)
    else:
        report = verify_file(path, sums, allow_pickle)
    if manifest is not None:
        from llmhost.store.loadcheck import drop_stamp, write_stamp

        # a stamp lets `serve` trust these files without hashing them again until they
        # change; a failed verification takes it away (a change that kept the mtime)
        try:
            if report.ok:
                write_stamp(path, manifest, started_ns)
            else:
                drop_stamp(path)
        except OSError as exc:
            report.notes.append(f"could not record the verification: {exc}")
    if as_json:
        typer.echo(json.dumps({"path": str(path), "ok": report.ok, **vars(report)}, indent=2))
    else:
        for note in report.notes:
            err.print(f"[dim]note: {note}[/]")
    if not report.ok:
        raise IntegrityError(f"{target} failed verification:\n  " + "\n  ".join(report.problems))
    if not as_json:
        typer.echo(f"ok: {path} ({len(report.checked)} checksums verified, layout valid)")


def _sigterm_as_interrupt() -> None:
    """SIGTERM during a pull stops it like Ctrl-C: state saved, resumable."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
