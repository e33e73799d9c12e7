"""Backups of an llmhost home: configuration, API keys, the audit log and the model store.

Layout of a backup folder:

    blobs/sha256/<hash>[.enc]        model files, stored once across all backups (by sha256)
    <id>.tar.zst[.enc]               the state of one backup
    <id>.json                        its sidecar: kind, parent, what it holds, sha256 of the
                                     archive, and an HMAC over all of it (`mac`)

A full backup holds every state file (config.toml, the audit head checkpoint audit.head, then
keys.db and audit.db copied online with SQLite's backup API, so a running server's writes never
tear them; the checkpoint is copied before the log, so the copy never ends before it) and every
model manifest;
the model files go to blobs. An incremental backup holds only the state files that changed
since the backup before it, and refers to that backup as its parent. Each sidecar lists the
whole state as of its backup (file -> sha256) and every model file (path -> sha256), so a
restore takes the newest full backup of the chain, applies the incrementals in order and
rebuilds the models from blobs, checking every hash.

A sidecar is signed (HMAC-SHA256) with a key that is not in the backup: for an encrypted backup
one derived from the encryption key, otherwise the backup key (`$LLMHOST_HOME/backup.key`, made
0600 by the first backup). Through the archive's and blobs' sha256 it names, the signature
covers everything; `verify` and `restore` refuse an unsigned or forged sidecar before reading
anything else. The keys that sign the audit log (audit.key) and backups (backup.key) are not
backed up: whoever holds a backup must not be able to forge either. Every file written here is
0600 in folders made 0700.

Steps of `create`: copy the state into a temporary folder -> hash -> pack the archive into a
temporary file -> (encrypt) -> fsync -> rename into place -> write the sidecar last. A backup
without its sidecar does not exist, so an interrupted backup leaves nothing half-made behind
(and the next `prune` removes its leftovers)."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import zstandard

from llmhost.errors import BackupError, ConfigError, LlmhostError, NotFound
from llmhost.files import (
    PRIVATE_FILE,
    atomic_write,
    fsync_dir,
    load_or_create_key,
    open_private,
    private_dir,
)
from llmhost.store import crypto
from llmhost.store.manifest import MANIFEST_NAME, read_manifest
from llmhost.store.names import safe_join
from llmhost.store.verify import hash_file

Kind = Literal["full", "incremental"]
SQLITE_STATE = ("keys.db", "audit.db")
PLAIN_STATE = ("config.toml", "audit.head")  # copied before the databases
RECORD_LABEL = b"llmhost backup record v1"
_BLOCK = 4 << 20


@dataclass
class BackupInfo:
    id: str
    kind: Kind
    created: float
    parent: str | None
    encrypted: bool
    archive: str
    archive_sha256: str
    archive_size: int
    state: dict[str, str]  # every state file as of this backup -> sha256
    included: list[str]  # the state files this archive holds
    models: dict[str, str]  # models/<name>/<tag>/<file> -> sha256, manifests included
    notes: list[str] = field(default_factory=list)
    mac: str = ""  # HMAC-SHA256 of everything above, under the record key

    def signed_bytes(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "mac"}
        return RECORD_LABEL + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def load(cls, path: Path) -> BackupInfo:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BackupError(f"{path.name}: unreadable backup record ({exc})") from exc


def _sha256_file(path: Path) -> str:
    return hash_file(path)[0]


def _copy_hashing(src: Path, dst: Path, private: bool = False) -> str:
    h = hashlib.sha256()
    with src.open("rb") as fin, open_private(dst) if private else dst.open("wb") as fout:
        while block := fin.read(_BLOCK):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included), via the backup API."""
    uri = f"{src.resolve().as_uri()}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True)) as s,
        contextlib.closing(sqlite3.connect(dst)) as d,
    ):
        s.backup(d)


class Backups:
    """The backups kept in one folder, for the llmhost home `home`."""

    def __init__(
        self,
        home: Path,
        dest: Path,
        key: bytes | None = None,
        record_key_file: Path | None = None,
    ):
        self.home = home
        self.dest = dest
        self.key = key
        self.record_key_file = record_key_file or home / "backup.key"
        self.blobs = dest / "blobs" / "sha256"
        self.new_files: list[Path] = []  # what `create` wrote, for a remote copy to upload
        self.known_blobs: set[str] = set()  # blob names kept elsewhere (a bucket)

    # --- listing ---------------------------------------------------------------------------

    def list(self) -> list[BackupInfo]:
        if not self.dest.is_dir():
            return []
        found = [BackupInfo.load(p) for p in self.dest.glob("llmhost-*.json")]
        return sorted(found, key=lambda b: (b.created, b.id))

    def get(self, backup_id: str | None) -> BackupInfo:
        items = self.list()
        if not items:
            raise NotFound(f"no backups in {self.dest}")
        if backup_id is None:
            return items[-1]
        for b in items:
            if b.id == backup_id:
                return b
        raise NotFound(f"no backup {backup_id!r} in {self.dest}")

    def chain(self, target: BackupInfo) -> builtins.list[BackupInfo]:
        """Full backup first, then each incremental up to `target`."""
        by_id = {b.id: b for b in self.list()}
        out = [target]
        while out[-1].kind == "incremental":
            parent = by_id.get(out[-1].parent or "")
            if parent is None:
                raise BackupError(f"backup {out[-1].id} needs {out[-1].parent}, which is gone")
            out.append(parent)
        return out[::-1]

    # --- signed records --------------------------------------------------------------------

    def _record_key(self, encrypted: bool, create: bool = False) -> bytes:
        if encrypted:
            if self.key is None:
                raise ConfigError("the backup is encrypted: give the model key (--key-file)")
            return hmac.new(self.key, RECORD_LABEL, hashlib.sha256).digest()
        return load_or_create_key(self.record_key_file, create=create, what="backup key")

    @staticmethod
    def _mac(key: bytes, info: BackupInfo) -> str:
        return hmac.new(key, info.signed_bytes(), hashlib.sha256).hexdigest()

    def _sign(self, info: BackupInfo) -> None:
        info.mac = self._mac(self._record_key(info.encrypted, create=True), info)

    def check_record(self, info: BackupInfo) -> None:
        """BackupError unless the sidecar carries a valid signature under the record key."""
        if not info.mac:
            raise BackupError(
                f"{info.id}: its record is not signed (forged, or made by an older llmhost); "
                "refusing it"
            )
        try:
            key = self._record_key(info.encrypted)
        except ConfigError as exc:  # no key given or kept: still a configuration error
            raise ConfigError(f"{info.id}: cannot check its record: {exc.message}") from exc
        if not hmac.compare_digest(self._mac(key, info), info.mac):
            which = "the model key" if info.encrypted else f"the backup key {self.record_key_file}"
            raise BackupError(
                f"{info.id}: its record's signature does not match {which}: forged or altered"
            )

    # --- create ----------------------------------------------------------------------------

    def _state_files(self, tmp: Path) -> dict[str, Path]:
        """Copies of the state files in `tmp` (SQLite online-consistent), by name."""
        out = {}
        for name in PLAIN_STATE:
            if (self.home / name).is_file():
                shutil.copy2(self.home / name, tmp / name)
                out[name] = tmp / name
        for name in SQLITE_STATE:
            if (self.home / name).is_file():
                sqlite_copy(self.home / name, tmp / name)
                out[name] = tmp / name
        return out

    def _model_files(self) -> tuple[dict[str, Path], dict[str, str], builtins.list[str]]:
        """Every registered model file: archive path -> source, and the sha256 its manifest
        records. Unregistered folders (the demo model, partial pulls) are not backed up."""
        root = self.home / "models"
        files: dict[str, Path] = {}
        sums: dict[str, str] = {}
        notes: builtins.list[str] = []
        if not root.is_dir():
            return files, sums, notes
        for mf in sorted(root.glob(f"*/*/{MANIFEST_NAME}")):
            folder = mf.parent
            rel = folder.relative_to(self.home).as_posix()
            manifest = read_manifest(folder)
            files[f"{rel}/{MANIFEST_NAME}"] = mf
            for entry in manifest.files:
                src = safe_join(folder, entry.path)
                if not src.is_file():
                    notes.append(f"{rel}/{entry.path} is missing on disk; not backed up")
                    continue
                files[f"{rel}/{entry.path}"] = src
                sums[f"{rel}/{entry.path}"] = entry.sha256
        return files, sums, notes

    def _blob_path(self, sha: str) -> Path:
        return self.blobs / (sha + (".enc" if self.key else ""))

    def _store_blob(self, src: Path, sha: str) -> None:
        target = self._blob_path(sha)
        if target.exists() or target.name in self.known_blobs:
            return  # deduplicated: this content is already kept
        private_dir(target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.plain")
        sealed = target.with_name(f".{target.name}.{os.getpid()}.enc")
        try:
            got = _copy_hashing(src, tmp, private=True)
            if got != sha:
                raise BackupError(
                    f"{src} does not match its manifest (sha256 {got[:12]}… != {sha[:12]}…); "
                    "run `llmhost verify` on the model"
                )
            if self.key:
                with open_private(sealed, "wb+") as f:
                    crypto.encrypt_into_fd(tmp, f.fileno(), self.key)
                    os.fsync(f.fileno())
                os.replace(sealed, target)
            else:
                os.replace(tmp, target)
            self.new_files.append(target)
        finally:
            tmp.unlink(missing_ok=True)
            sealed.unlink(missing_ok=True)

    def create(self, kind: Kind = "full") -> BackupInfo:
        private_dir(self.dest)
        self._record_key(bool(self.key), create=True)  # a missing key fails before any work
        previous = self.list()
        parent = previous[-1] if previous else None
        if kind == "incremental":
            if parent is None:
                raise BackupError("no backup yet to increment from; make a full backup first")
            if parent.encrypted != bool(self.key):
                raise BackupError("an incremental backup must be encrypted like its parent")
            self.check_record(parent)  # its list of state hashes decides what is left out
        created = time.time()
        stamp = datetime.fromtimestamp(created, timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        backup_id = f"llmhost-{stamp}-{kind}"
        with tempfile.TemporaryDirectory(dir=self.dest, prefix=".create-") as t:
            tmp = Path(t)
            (tmp / "state").mkdir()
            state_files = self._state_files(tmp / "state")
            state = {name: _sha256_file(p) for name, p in state_files.items()}
            if kind == "full" or parent is None:  # (an incremental one has a parent)
                included = sorted(state)
            else:
                included = sorted(n for n, h in state.items() if parent.state.get(n) != h)
            model_files, sums, notes = self._model_files()
            models = {}
            for rel, src in model_files.items():
                if rel.endswith(MANIFEST_NAME):
                    models[rel] = _sha256_file(src)
                else:
                    self._store_blob(src, sums[rel])
                    models[rel] = sums[rel]
            archive = tmp / "archive.tar.zst"
            self._pack(
                archive,
                {f"state/{n}": state_files[n] for n in included},
                {rel: src for rel, src in model_files.items() if rel.endswith(MANIFEST_NAME)},
                {"id": backup_id, "state": state, "models": models},
            )
            name = backup_id + ".tar.zst" + (".enc" if self.key else "")
            if self.key:
                crypto.encrypt_file(archive, tmp / name, self.key)
            else:
                os.replace(archive, tmp / name)
            final = self.dest / name
            info = BackupInfo(
                id=backup_id,
                kind=kind,
                created=created,
                parent=parent.id if kind == "incremental" and parent else None,
                encrypted=bool(self.key),
                archive=name,
                archive_sha256=_sha256_file(tmp / name),
                archive_size=(tmp / name).stat().st_size,
                state=state,
                included=included,
                models=models,
                notes=notes,
            )
            self._sign(info)
            os.chmod(tmp / name, PRIVATE_FILE)
            os.replace(tmp / name, final)
        fsync_dir(self.dest)
        atomic_write(
            self.dest / f"{backup_id}.json",
            json.dumps(asdict(info), indent=1).encode(),
            private=True,
        )
        self.new_files += [final, self.dest / f"{backup_id}.json"]
        return info

    def referenced(self, items: builtins.list[BackupInfo]) -> set[str]:
        """Every file name (relative to the folder) that `items` need."""
        out = set()
        for b in items:
            out |= {b.archive, f"{b.id}.json"}
            out |= {
                f"blobs/sha256/{sha}{'.enc' if b.encrypted else ''}"
                for rel, sha in b.models.items()
                if not rel.endswith(MANIFEST_NAME)
            }
        return out

    @staticmethod
    def _pack(archive: Path, state: dict[str, Path], manifests: dict[str, Path], meta: dict):
        cctx = zstandard.ZstdCompressor(level=3, threads=-1)
        with archive.open("wb") as raw, cctx.stream_writer(raw, closefd=False) as zw:
            with tarfile.open(fileobj=zw, mode="w|") as tar:
                for arcname, src in {**state, **manifests}.items():
                    tar.add(src, arcname=arcname, recursive=False)
                data = json.dumps(meta).encode()
                ti = tarfile.TarInfo("backup.json")
                ti.size, ti.mtime = len(data), int(time.time())
                tar.addfile(ti, io.BytesIO(data))
            zw.flush(zstandard.FLUSH_FRAME)
            raw.flush()
            os.fsync(raw.fileno())

    # --- reading archives ------------------------------------------------------------------

    def _open_archive(self, info: BackupInfo, stack: contextlib.ExitStack) -> tarfile.TarFile:
        path = self.dest / info.archive
        if not path.is_file():
            raise BackupError(f"{info.archive} is missing")
        if info.encrypted:
            if self.key is None:
                raise ConfigError(f"{info.id} is encrypted: give the model key (--key-file)")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=self.dest))
            plain = Path(tmp) / "archive.tar.zst"
            try:
                crypto.decrypt_file(path, plain, self.key)
            except LlmhostError as exc:
                raise BackupError(f"{info.archive}: {exc.message}") from exc
            path = plain
        raw = stack.enter_context(path.open("rb"))
        zr = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
        return stack.enter_context(tarfile.open(fileobj=zr, mode="r|"))

    def _extract(self, info: BackupInfo, into: Path) -> dict[str, Path]:
        """Every member of the archive written under `into`, hashed against the record."""
        out = {}
        try:
            with contextlib.ExitStack() as stack:
                tar = self._open_archive(info, stack)
                for member in tar:
                    if not member.isfile() or member.name == "backup.json":
                        continue
                    target = safe_join(into, member.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = tar.extractfile(member)
                    if data is None:
                        continue
                    with open_private(target) as f:
                        shutil.copyfileobj(data, f)
                    out[member.name] = target
        except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
            raise BackupError(f"{info.archive} is damaged: {exc}") from exc
        for name, path in out.items():
            want = (
                info.state.get(name.removeprefix("state/"))
                if name.startswith("state/")
                else info.models.get(name)
            )
            if want != _sha256_file(path):
                raise BackupError(f"{info.archive}: {name} does not match its record")
        return out

    def verify(self, info: BackupInfo) -> builtins.list[str]:
        """Problems found in one backup (empty when it is whole)."""
        try:
            self.check_record(info)
        except LlmhostError as exc:  # forged, unsigned, or no key to check it
            return [exc.message]
        problems = []
        path = self.dest / info.archive
        if not path.is_file():
            return [f"{info.archive} is missing"]
        if _sha256_file(path) != info.archive_sha256:
            problems.append(f"{info.archive} changed since it was written (sha256 differs)")
        with tempfile.TemporaryDirectory(dir=self.dest) as t:
            try:
                got = self._extract(info, Path(t))
            except LlmhostError as exc:  # damaged, or encrypted and no key given
                return [*problems, exc.message]
            want = {f"state/{n}" for n in info.included} | {
                r for r in info.models if r.endswith(MANIFEST_NAME)
            }
            missing = sorted(want - set(got))
            problems += [f"{info.archive} lacks {m}" for m in missing]
        seen: set[str] = set()
        for rel, sha in info.models.items():
            if rel.endswith(MANIFEST_NAME) or sha in seen:
                continue
            seen.add(sha)
            problems += self._check_blob(sha, rel, info.encrypted)
        if info.kind == "incremental":
            try:
                for step in self.chain(info)[:-1]:
                    self.check_record(step)
            except LlmhostError as exc:
                problems.append(exc.message)
        return problems

    def _check_blob(self, sha: str, rel: str, encrypted: bool) -> builtins.list[str]:
        blob = self.blobs / (sha + (".enc" if encrypted else ""))
        if not blob.is_file():
            return [f"model file {rel}: blob {sha[:12]}… is missing"]
        if encrypted:
            if self.key is None:
                return [f"{rel}: encrypted; give the key to check it"]
            with tempfile.TemporaryDirectory(dir=self.dest) as t:
                try:
                    crypto.decrypt_file(blob, Path(t) / "b", self.key)
                except LlmhostError as exc:
                    return [f"model file {rel}: {exc.message}"]
                ok = _sha256_file(Path(t) / "b") == sha
        else:
            ok = _sha256_file(blob) == sha
        return [] if ok else [f"model file {rel}: blob {sha[:12]}… is damaged"]

    # --- restore ---------------------------------------------------------------------------

    def restore(self, info: BackupInfo, home: Path, force: bool = False) -> builtins.list[str]:
        """Rebuild `home` as it was at `info`; returns what was restored."""
        existing = [n for n in (*PLAIN_STATE, *SQLITE_STATE, "models") if (home / n).exists()]
        models_root = home / "models"
        if existing and not force:
            raise BackupError(
                f"{home} already has {', '.join(existing)}; restore with --force to replace them"
            )
        chain = self.chain(info)
        for step in chain:  # nothing from an unsigned or forged record is even unpacked
            self.check_record(step)
        private_dir(home)
        with tempfile.TemporaryDirectory(dir=home, prefix=".restore-") as t:
            stage = Path(t)
            state: dict[str, Path] = {}
            for step in chain:
                got = self._extract(step, stage / step.id)
                for name, path in got.items():
                    if name.startswith("state/"):
                        state[name.removeprefix("state/")] = path
            missing = set(info.state) - set(state)
            if missing:
                raise BackupError(f"the chain of {info.id} lacks {', '.join(sorted(missing))}")
            manifests = self._extract(info, stage / "final")
            models_stage = stage / "models"
            for rel, sha in info.models.items():
                target = safe_join(stage, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                if rel.endswith(MANIFEST_NAME):
                    shutil.copy2(manifests[rel], target)
                    continue
                blob = self.blobs / (sha + (".enc" if info.encrypted else ""))
                if not blob.is_file():
                    raise BackupError(f"model file {rel}: blob {sha[:12]}… is missing")
                if info.encrypted:
                    crypto.decrypt_file(blob, target, self.key or b"")
                    got_sha = _sha256_file(target)
                else:
                    got_sha = _copy_hashing(blob, target)
                if got_sha != sha:
                    raise BackupError(f"model file {rel}: blob {sha[:12]}… is damaged")
            # everything checked: now replace what the home has
            for name in (*PLAIN_STATE, *SQLITE_STATE):
                for suffix in ("", "-wal", "-shm"):
                    (home / f"{name}{suffix}").unlink(missing_ok=True)
                if name in info.state:
                    os.chmod(state[name], PRIVATE_FILE)
                    os.replace(state[name], home / name)
            if models_stage.exists() or models_root.exists():
                if models_root.exists():
                    shutil.rmtree(models_root)
                if models_stage.exists():
                    os.replace(models_stage, models_root)
        fsync_dir(home)
        return sorted(info.state) + sorted(r for r in info.models if r.endswith(MANIFEST_NAME))

    # --- prune -----------------------------------------------------------------------------

    def prune(self, keep: int) -> builtins.list[str]:
        """Keep the newest `keep` full backups and the incrementals that build on them; remove
        the rest, then every blob no remaining backup refers to."""
        if keep < 1:
            raise ConfigError("--keep must be at least 1")
        items = self.list()
        fulls = [b for b in items if b.kind == "full"]
        kept = {b.id for b in fulls[-keep:]}
        for b in items:  # in creation order, so parents come first
            if b.kind == "incremental" and b.parent in kept:
                kept.add(b.id)
        removed = []
        for b in items:
            if b.id not in kept:
                (self.dest / b.archive).unlink(missing_ok=True)
                (self.dest / f"{b.id}.json").unlink(missing_ok=True)
                removed.append(b.id)
        referenced = {
            sha + (".enc" if b.encrypted else "")
            for b in items
            if b.id in kept
            for rel, sha in b.models.items()
            if not rel.endswith(MANIFEST_NAME)
        }
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name not in referenced:
                    blob.unlink()
        for leftover in self.dest.glob(".create-*"):  # an interrupted backup
            shutil.rmtree(leftover, ignore_errors=True)
        return removed
