"""`pull`: fetch a model from a source into the local registry, all or nothing.

Steps:
1. resolve SOURCE into files with what the source publishes (size, sha256, md5, git blob id);
2. validate the target name and every file path (nothing may escape the models folder);
3. probe every file still to fetch (size, Range support) and check the free disk space;
4. fetch each file into `models/.partial/<id>/` (the id depends only on source and name, so
   running the same command again resumes), each verified as it completes;
5. check the layout (GGUF header and tensors, Hugging Face folder, no pickle unless allowed),
   write the manifest and rename the folder into place. Before that step nothing is registered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmhost.errors import ConfigError, InsufficientStorage, IntegrityError
from llmhost.store.download import (
    DEFAULT_CONNECTIONS,
    Downloader,
    FileResult,
    Probe,
    Progress,
    RemoteFile,
)
from llmhost.store.manifest import FileEntry, Manifest, atomic_write, detect_format
from llmhost.store.names import ModelRef, parse_ref, safe_join
from llmhost.store.registry import ModelStore
from llmhost.store.sources import Resolved, SourceOptions, resolve
from llmhost.store.verify import Report, check_layout

_DONE = ".done.json"
_RESERVE = 64 << 20  # keep some room for the manifest, logs and everyone else


@dataclass
class PullPlan:
    ref: ModelRef
    resolved: Resolved
    staging: Path
    pending: list[tuple[RemoteFile, Probe]]
    done: dict[str, FileResult]
    need_bytes: int


def _staging_key(source: str, ref: ModelRef) -> str:
    return hashlib.sha256(f"{source}\0{ref}".encode()).hexdigest()[:16]


def _load_done(staging: Path) -> dict[str, FileResult]:
    try:
        data = json.loads((staging / _DONE).read_text())
        return {k: FileResult(**v) for k, v in data.items()}
    except (OSError, ValueError, TypeError):
        return {}


def _save_done(staging: Path, done: dict[str, FileResult]) -> None:
    data = {k: vars(v) for k, v in done.items()}
    atomic_write(staging / _DONE, json.dumps(data).encode())


def plan(
    store: ModelStore,
    source: str,
    *,
    name: str | None = None,
    opts: SourceOptions | None = None,
    downloader: Downloader,
    force: bool = False,
    free_space: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free,
) -> PullPlan:
    resolved = resolve(source, opts)
    ref = parse_ref(name or resolved.default_name)
    if store.exists(ref) and not force:
        raise ConfigError(f"{ref} exists; pass --force to replace it, or choose --name")
    staging = store.staging_dir(_staging_key(resolved.source, ref))
    staging.mkdir(parents=True, exist_ok=True)
    done = _load_done(staging)
    pending = []
    need = 0
    for rf in resolved.files:
        dest = safe_join(staging, rf.path)
        prev = done.get(rf.path)
        unchanged = prev and (rf.sha256 is None or rf.sha256 == prev.sha256)
        if unchanged and prev and dest.is_file() and dest.stat().st_size == prev.size:
            continue
        done.pop(rf.path, None)
        probe = downloader.probe(rf)
        part = dest.with_name(dest.name + ".part")
        preallocated = (
            part.is_file() and probe.size is not None and (part.stat().st_size == probe.size)
        )
        if not preallocated:
            need += probe.size or 0
        pending.append((rf, probe))
    free = free_space(staging)
    if need + _RESERVE > free:
        raise InsufficientStorage(
            f"not enough disk space in {store.root}: the download needs {need / 1e9:.2f} GB "
            f"more, {free / 1e9:.2f} GB are free"
        )
    return PullPlan(ref, resolved, staging, pending, done, need)


def execute(
    store: ModelStore,
    p: PullPlan,
    *,
    downloader: Downloader,
    allow_pickle: bool = False,
    force: bool = False,
) -> Manifest:
    for rf, probe in p.pending:
        result = downloader.fetch(rf, safe_join(p.staging, rf.path), probe)
        p.done[rf.path] = result
        _save_done(p.staging, p.done)
    files = []
    for rf in p.resolved.files:
        r = p.done[rf.path]
        files.append(FileEntry(path=rf.path, size=r.size, sha256=r.sha256, md5=r.md5 or rf.md5))
    report = Report()
    check_layout(p.staging, [f.path for f in files], allow_pickle, report)
    if not report.ok:
        raise IntegrityError(
            f"{p.resolved.source} is not a usable model; nothing was registered:\n  "
            + "\n  ".join(report.problems)
        )
    (p.staging / _DONE).unlink(missing_ok=True)
    manifest = Manifest(
        name=p.ref.name,
        tag=p.ref.tag,
        source=p.resolved.source,
        revision=p.resolved.revision,
        format=detect_format([f.path for f in files]),
        files=files,
    )
    store.commit(p.staging, manifest, force=force)
    return manifest


def pull(
    store: ModelStore,
    source: str,
    *,
    name: str | None = None,
    opts: SourceOptions | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    force: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    min_segment: int | None = None,
    free_space: Callable[[Path], int] | None = None,
) -> Manifest:
    opts = opts or SourceOptions()
    kwargs: dict[str, Any] = {} if min_segment is None else {"min_segment": min_segment}
    with Downloader(connections=connections, progress=progress, stop=stop, **kwargs) as dl:
        extra = {} if free_space is None else {"free_space": free_space}
        p = plan(store, source, name=name, opts=opts, downloader=dl, force=force, **extra)
        return execute(store, p, downloader=dl, allow_pickle=opts.allow_pickle, force=force)
