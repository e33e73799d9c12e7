"""Files only their owner may read (prompts, keys, backups), made so whatever the process
umask, and atomic writes (temp file in the same folder, fsync, rename, fsync the folder)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from llmhost.errors import ConfigError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
KEY_BYTES = 32


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents as 0700; folders that already exist keep their
    mode (the operator chose it)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made by another process meanwhile
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask
    return Path(path)


def private_file(path: Path) -> Path:
    """Make sure `path` exists and is 0600 (created empty when missing), before anything such
    as SQLite opens it: SQLite gives its -wal and -shm files the database file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path) -> Path:
    """A SQLite database file made 0600 (and its folder 0700 if new) before it is opened;
    -wal and -shm left by an older version are tightened too."""
    private_dir(Path(path).parent)
    private_file(path)
    for suffix in ("-wal", "-shm"):
        side = Path(path).with_name(Path(path).name + suffix)
        if side.exists():
            os.chmod(side, PRIVATE_FILE)
    return Path(path)


def open_private(path: Path, mode: str = "wb", **kwargs):
    """`open(path, mode, **kwargs)` for writing, the file created (or truncated) 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: all or nothing.
    `private` makes the file 0600 from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_private(tmp) if private else tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def refuse_shared(path: Path, mode: int, what: str) -> None:
    """A secret others may read is refused: whoever reads it can use or forge with it."""
    if mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by others; run: chmod 600 {path}")


def load_or_create_key(path: Path, *, create: bool = True, what: str = "key") -> bytes:
    """A 32-byte secret kept in `path` (64 hex digits), created 0600 on first use when
    `create`. A key readable by others is refused: whoever reads it can forge what it signs."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"no {what} at {path}") from None
        private_dir(path.parent)
        # written whole under a temporary name, then linked into place, which fails if the
        # name exists: two processes starting at once end up with one key, never half of one
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open_private(tmp, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return load_or_create_key(path, create=False, what=what)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    refuse_shared(path, st.st_mode, what)
    if st.st_size > 1024:
        raise ConfigError(f"{what} {path} is not a key (64 hex digits)")
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is not a key (64 hex digits)") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{what} {path} is not a key (64 hex digits)")
    return key
