"""What a stored model must pass before it is served, fast enough to run at every start.

A model folder with a manifest (`llmhost pull` put it there) is checked against it:
1. every file the manifest lists exists with the listed size, and the served path (a file, or
   the weight files of a folder) is one the manifest lists: always, it costs a `stat` per file;
2. the sha256 of each file, unless a stamp that `llmhost verify` wrote (`.verified.json`:
   size, mtime_ns and inode of each file it hashed, and when) shows the file unchanged since.
   Files the stamp does not cover are hashed when they total at most `hash_max_bytes`
   (`verify_hash_max_mb`, 1 GiB by default: a second or two at the speed sha256 runs on one
   core); larger ones get the size check only (`LoadCheck.unhashed`, for the caller to warn).
   `mode="full"` hashes every file whatever the stamp says; `mode="size"` never hashes.

The stamp guards against files changed by ordinary means (an edit, a copy, a partial restore),
as `make` or git trust mtimes; whoever can write the folder can rewrite the manifest as well, so
neither is a defence against them. A path that is not in a stored model's folder has no
manifest and is served as it is."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llmhost.errors import IntegrityError
from llmhost.store.manifest import (
    MANIFEST_NAME,
    STAMP_NAME,
    Manifest,
    atomic_write,
    read_manifest,
)
from llmhost.store.names import safe_join
from llmhost.store.sources import PICKLE_SUFFIXES
from llmhost.store.verify import hash_file

log = logging.getLogger("llmhost.store")

HASH_MAX_BYTES = 1 << 30
# Files modified this close to the moment hashing began may have changed within one tick of a
# coarse filesystem clock after they were read: a stamp never vouches for them.
_RACY_NS = 2_000_000_000
_STAMP_MAX_BYTES = 4 << 20
_WEIGHTS = (".gguf", ".safetensors", *PICKLE_SUFFIXES)
Mode = Literal["auto", "full", "size"]


class FileState(BaseModel):
    size: int
    mtime_ns: int
    ino: int


class Stamp(BaseModel):
    """Written by `llmhost verify` after every checksum of the manifest matched."""

    verified_at: datetime
    hashed_from_ns: int  # when hashing began (time.time_ns())
    files_sha256: str  # of the manifest's file list: another manifest voids the stamp
    files: dict[str, FileState] = Field(default_factory=dict)


@dataclass
class LoadCheck:
    """What was checked: `hashed` at this start, `stamped` trusted from the stamp, `unhashed`
    (sizes only, too large to hash at start and not stamped)."""

    folder: Path
    manifest: Manifest
    hashed: list[str] = field(default_factory=list)
    stamped: list[str] = field(default_factory=list)
    unhashed: list[str] = field(default_factory=list)


def file_state(path: Path) -> FileState:
    st = path.stat()
    return FileState(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)


def _files_digest(manifest: Manifest) -> str:
    rows = [[f.path, f.size, f.sha256] for f in sorted(manifest.files, key=lambda f: f.path)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def write_stamp(folder: Path, manifest: Manifest, hashed_from_ns: int) -> Stamp:
    """Record that every file of `manifest` matched its checksum when hashed from
    `hashed_from_ns` on; call only after a verification that found no problem."""
    files = {}
    for entry in manifest.files:
        state = file_state(safe_join(folder, entry.path))
        if state.mtime_ns < hashed_from_ns - _RACY_NS:
            files[entry.path] = state
    stamp = Stamp(
        verified_at=datetime.now(timezone.utc),
        hashed_from_ns=hashed_from_ns,
        files_sha256=_files_digest(manifest),
        files=files,
    )
    atomic_write(folder / STAMP_NAME, stamp.model_dump_json(indent=1).encode() + b"\n")
    return stamp


def drop_stamp(folder: Path) -> None:
    (folder / STAMP_NAME).unlink(missing_ok=True)


def read_stamp(folder: Path, manifest: Manifest) -> Stamp | None:
    """The folder's stamp if there is a readable one for this manifest, else None."""
    path = folder / STAMP_NAME
    try:
        with path.open("rb") as f:
            raw = f.read(_STAMP_MAX_BYTES + 1)
        if len(raw) > _STAMP_MAX_BYTES:
            raise ValueError("too large")
        stamp = Stamp.model_validate(json.loads(raw))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return stamp if stamp.files_sha256 == _files_digest(manifest) else None


def stored_folder(path: Path) -> Path | None:
    """The stored model folder `path` is (or is a file of), or None if it has no manifest."""
    folder = path if path.is_dir() else path.parent
    return folder if (folder / MANIFEST_NAME).is_file() else None


def _check_served_path(path: Path, folder: Path, manifest: Manifest) -> None:
    listed = {f.path for f in manifest.files}
    if path.is_dir():
        extra = sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file()
            and p.name.removesuffix(".enc").endswith(_WEIGHTS)
            and p.name not in listed
        )
        if extra:
            raise IntegrityError(
                f"{folder} holds weight files its manifest does not list ({', '.join(extra)}); "
                "remove them or pull the model again"
            )
    elif path.name not in listed:
        raise IntegrityError(
            f"{path} is not listed in the manifest of {manifest.ref}; it is not served"
        )


def check_before_load(
    path: Path | str, *, mode: Mode = "auto", hash_max_bytes: int = HASH_MAX_BYTES
) -> LoadCheck | None:
    """Check the stored model at `path` (see the module docstring); None when `path` is not in
    a stored model's folder. Raises IntegrityError naming every mismatch."""
    path = Path(path).expanduser()
    folder = stored_folder(path)
    if folder is None:
        return None
    manifest = read_manifest(folder)
    _check_served_path(path, folder, manifest)
    result = LoadCheck(folder=folder, manifest=manifest)
    problems: list[str] = []
    states: dict[str, FileState] = {}
    for entry in manifest.files:
        try:
            file = safe_join(folder, entry.path)
            states[entry.path] = state = file_state(file)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        except OSError:
            problems.append(f"{entry.path}: missing")
            continue
        if state.size != entry.size:
            problems.append(f"{entry.path}: {state.size} bytes, the manifest says {entry.size}")
    if not problems and mode != "size":
        stamp = read_stamp(folder, manifest) if mode == "auto" else None
        covered = stamp.files if stamp is not None else {}
        todo = [f for f in manifest.files if covered.get(f.path) != states[f.path]]
        result.stamped = [f.path for f in manifest.files if covered.get(f.path) == states[f.path]]
        if mode == "auto" and sum(f.size for f in todo) > hash_max_bytes:
            result.unhashed = [f.path for f in todo]
            todo = []
        t0 = time.monotonic()
        for entry in todo:
            try:
                sha, _ = hash_file(safe_join(folder, entry.path))
            except OSError as exc:  # gone or unreadable since the stat above
                problems.append(f"{entry.path}: unreadable: {exc.strerror or exc}")
                continue
            if sha != entry.sha256:
                problems.append(f"{entry.path}: sha256 {sha} does not match the manifest")
            else:
                result.hashed.append(entry.path)
        if todo:
            log.info(
                "%s: sha256 of %d file(s) checked in %.1f s",
                manifest.ref,
                len(todo),
                time.monotonic() - t0,
            )
    if problems:
        raise IntegrityError(
            f"{manifest.ref} ({folder}) does not match its manifest, so it is not served:\n  "
            + "\n  ".join(problems)
            + f"\nRun `llmhost verify {manifest.ref}` for a full report, or pull it again."
        )
    return result
