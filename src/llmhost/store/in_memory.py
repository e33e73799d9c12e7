"""Serving an encrypted model without plaintext on disk: the weights are decrypted into tmpfs
(a file, or a folder for Hugging Face models) only for the load, readable by this user alone,
and removed as soon as the model holds them; leftovers of killed processes are swept."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from llmhost.errors import ConfigError
from llmhost.store import crypto

DECRYPT_PREFIX = "llmhost-dec-"
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")
_MOUNTINFO_MAX = 16 << 20
_OCTAL = re.compile(r"\\([0-7]{3})")


def clean_stale(folder: Path | str = "/dev/shm") -> list[Path]:
    """Remove decrypted copies left by processes that no longer run (killed while loading)."""
    removed = []
    for p in Path(folder).glob(f"{DECRYPT_PREFIX}*"):
        try:
            pid = int(p.name[len(DECRYPT_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_sealed(path: Path) -> bool:
    """Whether serving `path` (a file, or a model folder) means decrypting something."""
    if path.is_dir():
        return any(crypto.is_encrypted(p) for p in path.glob("*.enc"))
    return path.is_file() and crypto.is_encrypted(path)


def _decrypt_new(src: Path, out: Path, key: bytes) -> None:
    """Decrypt `src` into `out`, a new file only this user can read."""
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        crypto.decrypt_into_fd(src, fd, key)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    dev: tuple[int, int]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo octal escapes
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: Path = MOUNTINFO) -> list[Mount]:
    """The mounts of this process's namespace, in mount order (later ones hide earlier ones
    on the same point); empty when there is no readable mountinfo."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MOUNTINFO_MAX)
    except OSError:
        return []
    mounts = []
    for line in raw.decode("utf-8", "replace").splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        mounts.append(Mount(_unescape(fields[4]), rest[0], (int(major), int(minor))))
    return mounts


def _under(path: str, point: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


def filesystem_type(folder: Path | str, mounts: list[Mount] | None = None) -> str | None:
    """The type of the filesystem `folder` lies on, None if it cannot be told. The mount whose
    device is the folder's decides (right for bind mounts and any path to it); failing that
    (btrfs subvolumes report other device numbers), the longest mount point above its real
    path, the last of equals, as a later mount hides an earlier one."""
    real = os.path.realpath(folder)
    if mounts is None:
        mounts = read_mountinfo()
        if not mounts:  # no /proc: what psutil can tell
            mounts = [
                Mount(p.mountpoint, p.fstype, (-1, -1)) for p in psutil.disk_partitions(all=True)
            ]
    try:
        dev = os.stat(real).st_dev
        by_dev = [m for m in mounts if m.dev == (os.major(dev), os.minor(dev))]
    except OSError:
        by_dev = []
    if by_dev:
        return by_dev[-1].fstype
    above = [m for m in mounts if _under(real, m.point)]
    if not above:
        return None
    longest = max(len(m.point) for m in above)
    return [m for m in above if len(m.point) == longest][-1].fstype


def check_decrypt_dir(folder: Path, need: int = 0, *, allow_disk: bool = False) -> str | None:
    """Refuse (ConfigError) to decrypt into `folder` unless it is tmpfs or ramfs, or
    `allow_disk`; returns its filesystem type."""
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} does not exist; an encrypted model is decrypted only into "
            "memory (tmpfs), never to disk"
        )
    fstype = filesystem_type(folder)
    if fstype not in MEMORY_FS and not allow_disk:
        raise ConfigError(
            f"decrypt folder {folder} is on {fstype or 'a filesystem of unknown type'}, not "
            "tmpfs or ramfs: the decrypted model would be written to disk. Point "
            "LLMHOST_DECRYPT_DIR at a tmpfs folder (such as /dev/shm), or set "
            "LLMHOST_DECRYPT_ALLOW_DISK=true to accept plaintext weights on that disk"
        )
    if fstype != "ramfs":  # ramfs reports no size: it grows until memory runs out
        free = shutil.disk_usage(folder).free
        if need > free:
            raise ConfigError(f"{folder} has {free >> 20} MiB free; the model needs {need >> 20}")
    return fstype


@contextlib.contextmanager
def decrypted_folder_in_memory(
    src: Path | str, key: bytes, folder: Path | str = "/dev/shm", *, allow_disk: bool = False
) -> Iterator[Path]:
    """A model folder whose weight files are sealed (`X.enc`, as `llmhost encrypt` leaves a
    stored model): a private tmpfs folder with each weight decrypted under its plain name and
    links to the other files (config, tokenizer). Removed on exit; load inside the block."""
    src, folder = Path(src), Path(folder)
    sealed = [p for p in sorted(src.iterdir()) if p.is_file() and crypto.is_encrypted(p)]
    clean_stale(folder)
    check_decrypt_dir(folder, sum(crypto.plaintext_size(p) for p in sealed), allow_disk=allow_disk)
    target = folder / f"{DECRYPT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    target.mkdir(mode=0o700)
    try:
        for p in sorted(src.iterdir()):
            if p in sealed:
                _decrypt_new(p, target / p.name.removesuffix(".enc"), key)
            elif not (target / p.name).exists():
                (target / p.name).symlink_to(p.resolve())
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


@contextlib.contextmanager
def decrypted_in_memory(
    src: Path | str, key: bytes, folder: Path | str = "/dev/shm", *, allow_disk: bool = False
) -> Iterator[Path]:
    """Decrypt into a tmpfs file readable only by this user and remove it on exit. Load the
    model inside the block: a memory-mapped model keeps its pages after the name is gone, so
    no plaintext outlives the load, even if the process is later killed."""
    src, folder = Path(src), Path(folder)
    clean_stale(folder)
    check_decrypt_dir(folder, crypto.plaintext_size(src), allow_disk=allow_disk)
    target = folder / f"{DECRYPT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{src.suffix}"
    try:
        _decrypt_new(src, target, key)
        yield target
    finally:
        target.unlink(missing_ok=True)
