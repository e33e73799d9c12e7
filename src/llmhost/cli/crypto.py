"""`llmhost encrypt` / `decrypt`: AES-256-GCM model files at rest."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from llmhost.cli.options import KeyCommand, KeyFile
from llmhost.errors import ConfigError


def _report(verb: str, src: Path, dst: Path, seconds: float) -> None:
    size = src.stat().st_size
    rate = size / seconds / 1e9 if seconds > 0 else float("inf")
    typer.echo(f"{verb} {src} -> {dst} ({size / 1e6:.1f} MB, {rate:.2f} GB/s)")


def _new_key(path: Path, key_file: Path | None, key_command: str | None) -> Path:
    from llmhost.store import crypto

    if key_file or key_command:
        raise ConfigError("--new-key replaces --key-file/--key-command; give one")
    made = crypto.generate_key_file(path)
    typer.echo(f"new key written to {made} (mode 600); keep it apart from the model")
    return made


def _store():
    from llmhost.config import load_settings
    from llmhost.store.registry import ModelStore

    return ModelStore(load_settings().models_dir)


def _encrypt_stored(ref: str, key: bytes) -> None:
    t0 = time.perf_counter()
    m = _store().encrypt(ref, key)
    secs = time.perf_counter() - t0
    typer.echo(f"encrypted {m.ref}: {', '.join(f.path for f in m.files if f.plain_sha256)}")
    typer.echo(f"({m.size / 1e6:.1f} MB in {secs:.2f} s; serve it with --key-file)")


def _decrypt_stored(ref: str, key: bytes) -> None:
    m = _store().decrypt(ref, key)
    typer.echo(f"decrypted {m.ref}; every file matches its recorded sha256")


def encrypt(
    path: Path = typer.Argument(..., help="Model file, or name:tag of a stored model."),
    out: Path | None = typer.Option(None, help="Output file [PATH.enc]."),
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    new_key: Path | None = typer.Option(None, help="Create this key file (0600) and use it."),
) -> None:
    """Encrypt a model file with AES-256-GCM in authenticated chunks. Without a key option
    the key comes from LLMHOST_MODEL_KEY. `llmhost serve` loads the result directly."""
    from llmhost.store import crypto

    if not path.exists() and not out:
        if new_key is not None:
            key_file = _new_key(new_key, key_file, key_command)
        _encrypt_stored(str(path), crypto.load_key(key_file, key_command))
        return
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    if crypto.is_encrypted(path):
        raise ConfigError(f"{path} is already encrypted")
    if new_key is not None:
        key_file = _new_key(new_key, key_file, key_command)
    key = crypto.load_key(key_file, key_command)
    dst = out or path.with_name(path.name + ".enc")
    t0 = time.perf_counter()
    crypto.encrypt_file(path, dst, key)
    _report("encrypted", path, dst, time.perf_counter() - t0)


def decrypt(
    path: Path = typer.Argument(..., help="Encrypted file, or name:tag of a stored model."),
    out: Path | None = typer.Option(None, help="Where to write the plaintext (files)."),
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
) -> None:
    """Decrypt a model file; any tampering or a wrong key is refused before output lands."""
    from llmhost.store import crypto

    if not path.exists() and out is None:
        _decrypt_stored(str(path), crypto.load_key(key_file, key_command))
        return
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    if out is None:
        raise ConfigError("give --out for the plaintext file")
    key = crypto.load_key(key_file, key_command)
    t0 = time.perf_counter()
    crypto.decrypt_file(path, out, key)
    _report("decrypted", path, out, time.perf_counter() - t0)
