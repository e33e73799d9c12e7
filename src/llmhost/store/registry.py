"""The local model registry: one folder per `name:tag` under `LLMHOST_HOME/models`, each holding
the model's files and its manifest. A version appears only by an atomic rename of a complete,
verified folder, so a reader never sees half a model.

    models/
      org/model/v1/.manifest.json     name "org/model", tag "v1"
      org/model/v1/config.json ...
      .partial/<id>/                  downloads in progress (resumable)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmhost.errors import ConfigError, IntegrityError, InvalidRequest, ModelNotFound
from llmhost.store import crypto
from llmhost.store.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    fsync_dir,
    read_manifest,
    write_manifest,
)
from llmhost.store.names import ModelRef, parse_ref, safe_join
from llmhost.store.sources import PICKLE_SUFFIXES
from llmhost.store.verify import hash_file

PARTIAL = ".partial"
WEIGHT_SUFFIXES = (".gguf", ".safetensors", *PICKLE_SUFFIXES)
_TRASH = ".trash"


class ModelStore:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser()

    # --- lookup ---------------------------------------------------------------------------

    def version_dir(self, ref: ModelRef) -> Path:
        return safe_join(self.root, *ref.name.split("/"), ref.tag)

    def staging_dir(self, key: str) -> Path:
        return safe_join(self.root, PARTIAL, key)

    def exists(self, ref: ModelRef) -> bool:
        return (self.version_dir(ref) / MANIFEST_NAME).is_file()

    def get(self, ref: ModelRef | str) -> Manifest:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        folder = self.version_dir(ref)
        if not (folder / MANIFEST_NAME).is_file():
            raise ModelNotFound(f"no model {ref} in {self.root} (see `llmhost list`)")
        return read_manifest(folder)

    def list(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        found = []
        for pattern in (f"*/*/{MANIFEST_NAME}", f"*/*/*/{MANIFEST_NAME}"):
            for path in self.root.glob(pattern):
                if path.parent.relative_to(self.root).parts[0].startswith("."):
                    continue
                with contextlib.suppress(Exception):
                    found.append(read_manifest(path.parent))
        return sorted(found, key=lambda m: (m.name, m.tag))

    def find_channel(self, name: str, channel: str) -> Manifest:
        for m in self.list():
            if m.name == name and m.channel == channel:
                return m
        raise ModelNotFound(f"no version of {name} is on channel {channel!r}")

    def resolve(self, text: str) -> Path:
        """What `serve` and `verify` accept: an existing path, `name:tag`, or `name@channel`."""
        path = Path(text).expanduser()
        if path.exists():
            return path
        if "@" in text:
            name, _, channel = text.partition("@")
            found = self.find_channel(parse_ref(name).name, channel)
            return self.version_dir(ModelRef(found.name, found.tag))
        try:
            ref = parse_ref(text)
        except InvalidRequest as exc:
            raise ModelNotFound(f"{text!r} is neither a file nor a stored model: {exc}") from exc
        self.get(ref)
        return self.version_dir(ref)

    # --- changes ----------------------------------------------------------------------------

    def commit(self, staging: Path, manifest: Manifest, *, force: bool = False) -> Path:
        """Move a complete staging folder into place as `manifest.ref`, atomically."""
        ref = ModelRef(manifest.name, manifest.tag)
        target = self.version_dir(ref)
        write_manifest(staging, manifest)
        target.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():
            if not force:
                raise ConfigError(f"{ref} exists; pass --force to replace it, or choose --name")
            old = self._trash_path()
            os.replace(target, old)
        os.replace(staging, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def remove(self, ref: ModelRef | str) -> Manifest:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        manifest = self.get(ref)
        folder = self.version_dir(ref)
        trash = self._trash_path()
        os.replace(folder, trash)  # gone from listings at once, even if deleting takes a while
        shutil.rmtree(trash, ignore_errors=True)
        self._prune_empty(folder.parent)
        return manifest

    def tag(self, src: ModelRef | str, dst: ModelRef | str, *, force: bool = False) -> Manifest:
        """A new name:tag for the same files (hard links: no extra disk)."""
        src = parse_ref(src) if isinstance(src, str) else src
        dst = parse_ref(dst) if isinstance(dst, str) else dst
        manifest = self.get(src)
        if self.exists(dst) and not force:
            raise ConfigError(f"{dst} exists; pass --force to move it")
        staging = self.staging_dir(f"tag-{secrets.token_hex(6)}")
        staging.mkdir(parents=True)
        try:
            src_dir = self.version_dir(src)
            for f in manifest.files:
                out = safe_join(staging, f.path)
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(safe_join(src_dir, f.path), out)
                except OSError:
                    shutil.copy2(safe_join(src_dir, f.path), out)
            new = manifest.model_copy(update={"name": dst.name, "tag": dst.tag, "channel": None})
            self.commit(staging, new, force=force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return new

    def promote(self, ref: ModelRef | str, channel: str) -> Manifest:
        """Put one version of a name on a channel (stable, canary…); others of the name leave it."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        parse_ref(f"x:{channel}")  # same charset as a tag
        manifest = self.get(ref)
        for other in self.list():
            if other.name == ref.name and other.channel == channel and other.tag != ref.tag:
                other.channel = None
                write_manifest(self.version_dir(ModelRef(other.name, other.tag)), other)
        manifest.channel = channel
        write_manifest(self.version_dir(ref), manifest)
        return manifest

    def encrypt(self, ref: ModelRef | str, key: bytes) -> Manifest:
        """Encrypt the weight files of a version in place (`X` becomes `X.enc`); config and
        tokenizer files stay readable. The manifest keeps each plaintext's sha256."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        manifest = self.get(ref)
        if manifest.encrypted:
            raise ConfigError(f"{ref} is already encrypted")
        folder = self.version_dir(ref)
        files, plain = [], []
        for f in manifest.files:
            if not f.path.endswith(WEIGHT_SUFFIXES):
                files.append(f)
                continue
            src = safe_join(folder, f.path)
            dst = src.with_name(src.name + ".enc")
            crypto.encrypt_file(src, dst, key)
            sha, _ = hash_file(dst)
            files.append(
                FileEntry(
                    path=f"{f.path}.enc", size=dst.stat().st_size, sha256=sha, plain_sha256=f.sha256
                )
            )
            plain.append(src)
        if not plain:
            raise ConfigError(f"{ref} has no weight files to encrypt")
        manifest.files, manifest.encrypted = files, True
        write_manifest(folder, manifest)
        for src in plain:
            src.unlink()
        return manifest

    def decrypt(self, ref: ModelRef | str, key: bytes) -> Manifest:
        """The reverse of `encrypt`; each plaintext is checked against its recorded sha256."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        manifest = self.get(ref)
        if not manifest.encrypted:
            raise ConfigError(f"{ref} is not encrypted")
        folder = self.version_dir(ref)
        files, sealed = [], []
        for f in manifest.files:
            if not f.path.endswith(".enc"):
                files.append(f)
                continue
            src = safe_join(folder, f.path)
            dst = src.with_name(src.name.removesuffix(".enc"))
            crypto.decrypt_file(src, dst, key)
            sha, _ = hash_file(dst)
            if f.plain_sha256 and sha != f.plain_sha256:
                dst.unlink()
                raise IntegrityError(f"{f.path}: decrypted sha256 does not match the manifest")
            files.append(
                FileEntry(path=f.path.removesuffix(".enc"), size=dst.stat().st_size, sha256=sha)
            )
            sealed.append(src)
        manifest.files, manifest.encrypted = files, False
        write_manifest(folder, manifest)
        for src in sealed:
            src.unlink()
        return manifest

    def partials(self) -> Iterator[Path]:
        folder = self.root / PARTIAL
        if folder.is_dir():
            yield from (p for p in folder.iterdir() if p.is_dir())

    def _trash_path(self) -> Path:
        trash = self.root / _TRASH
        trash.mkdir(parents=True, exist_ok=True)
        return trash / secrets.token_hex(8)

    def _prune_empty(self, folder: Path) -> None:
        root = self.root.resolve()
        while folder.resolve() != root:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
