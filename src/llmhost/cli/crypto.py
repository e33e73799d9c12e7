"""`llmhost encrypt` / `decrypt`: AES-256-GCM model files at rest."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from llmhost.errors import ConfigError

KEY_FILE = typer.Option(None, "--key-file", help="Key file (0600): raw, hex or base64.")
KEY_COMMAND = typer.Option(None, "--key-command", help="Command that prints the key (KMS).")


def _report(verb: str, src: Path, dst: Path, seconds: float) -> None:
    size = src.stat().st_size
    rate = size / seconds / 1e9 if seconds > 0 else float("inf")
    typer.echo(f"{verb} {src} -> {dst} ({size / 1e6:.1f} MB, {rate:.2f} GB/s)")


def register(app: typer.Typer) -> None:
    @app.command()
    def encrypt(
        path: Path = typer.Argument(..., help="Model file to encrypt."),
        out: Path | None = typer.Option(None, help="Output file [PATH.enc]."),
        key_file: Path | None = KEY_FILE,
        key_command: str | None = KEY_COMMAND,
        new_key: Path | None = typer.Option(None, help="Create this key file (0600) and use it."),
    ) -> None:
        """Encrypt a model file with AES-256-GCM in authenticated chunks. Without a key option
        the key comes from LLMHOST_MODEL_KEY. `llmhost serve` loads the result directly."""
        from llmhost.store import crypto

        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
        if crypto.is_encrypted(path):
            raise ConfigError(f"{path} is already encrypted")
        if new_key is not None:
            if key_file or key_command:
                raise ConfigError("--new-key replaces --key-file/--key-command; give one")
            key_file = crypto.generate_key_file(new_key)
            typer.echo(f"new key written to {key_file} (mode 600); keep it apart from the model")
        key = crypto.load_key(key_file, key_command)
        dst = out or path.with_name(path.name + ".enc")
        t0 = time.perf_counter()
        crypto.encrypt_file(path, dst, key)
        _report("encrypted", path, dst, time.perf_counter() - t0)

    @app.command()
    def decrypt(
        path: Path = typer.Argument(..., help="Encrypted model file."),
        out: Path = typer.Option(..., help="Where to write the plaintext."),
        key_file: Path | None = KEY_FILE,
        key_command: str | None = KEY_COMMAND,
    ) -> None:
        """Decrypt a model file; any tampering or a wrong key is refused before output lands."""
        from llmhost.store import crypto

        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
        key = crypto.load_key(key_file, key_command)
        t0 = time.perf_counter()
        crypto.decrypt_file(path, out, key)
        _report("decrypted", path, out, time.perf_counter() - t0)
