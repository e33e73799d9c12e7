"""Serving an encrypted model without plaintext on disk: the weights are decrypted into tmpfs
(a file, or a folder for Hugging Face models) only for the load, readable by this user alone,
and removed as soon as the model holds them; leftovers of killed processes are swept."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmhost.errors import ConfigError
from llmhost.store import crypto

DECRYPT_PREFIX = "llmhost-dec-"


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


def _decrypt_new(src: Path, out: Path, key: bytes) -> None:
    """Decrypt `src` into `out`, a new file only this user can read."""
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        crypto.decrypt_into_fd(src, fd, key)
    finally:
        os.close(fd)


def _check_tmpfs(folder: Path, need: int) -> None:
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} does not exist; an encrypted model is decrypted only into "
            "memory (tmpfs), never to disk"
        )
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ConfigError(f"{folder} has {free >> 20} MiB free; the model needs {need >> 20}")


@contextlib.contextmanager
def decrypted_folder_in_memory(
    src: Path | str, key: bytes, folder: Path | str = "/dev/shm"
) -> Iterator[Path]:
    """A model folder whose weight files are sealed (`X.enc`, as `llmhost encrypt` leaves a
    stored model): a private tmpfs folder with each weight decrypted under its plain name and
    links to the other files (config, tokenizer). Removed on exit; load inside the block."""
    src, folder = Path(src), Path(folder)
    sealed = [p for p in sorted(src.iterdir()) if p.is_file() and crypto.is_encrypted(p)]
    clean_stale(folder)
    _check_tmpfs(folder, sum(crypto.plaintext_size(p) for p in sealed))
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
    src: Path | str, key: bytes, folder: Path | str = "/dev/shm"
) -> Iterator[Path]:
    """Decrypt into a tmpfs file readable only by this user and remove it on exit. Load the
    model inside the block: a memory-mapped model keeps its pages after the name is gone, so
    no plaintext outlives the load, even if the process is later killed."""
    src, folder = Path(src), Path(folder)
    clean_stale(folder)
    _check_tmpfs(folder, crypto.plaintext_size(src))
    target = folder / f"{DECRYPT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{src.suffix}"
    try:
        _decrypt_new(src, target, key)
        yield target
    finally:
        target.unlink(missing_ok=True)
