"""The manifest of one stored model version: where it came from and the size and checksums of
every file, written atomically beside the files as `.manifest.json`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llmhost.errors import IntegrityError
from llmhost.files import atomic_write as atomic_write  # re-exported for the store's callers
from llmhost.files import fsync_dir as fsync_dir

MANIFEST_NAME = ".manifest.json"
# Written by `llmhost verify` (store/loadcheck.py): which files it found whole, and when.
STAMP_NAME = ".verified.json"
Format = Literal["gguf", "hf", "other"]


class FileEntry(BaseModel):
    path: str
    size: int = Field(ge=0)
    sha256: str
    md5: str | None = None
    # An encrypted file keeps the checksum of its plaintext, so a decrypted copy can be checked.
    plain_sha256: str | None = None


class Manifest(BaseModel):
    schema_version: int = 1
    name: str
    tag: str
    source: str
    revision: str | None = None
    format: Format = "other"
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    channel: str | None = None
    encrypted: bool = False
    files: list[FileEntry] = Field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)


def detect_format(paths: list[str]) -> Format:
    if any(p.endswith((".gguf", ".gguf.enc")) for p in paths):
        return "gguf"
    if "config.json" in paths:
        return "hf"
    return "other"


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write(folder / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode() + b"\n")


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        raise IntegrityError(f"unreadable manifest {path}: {exc}") from exc
