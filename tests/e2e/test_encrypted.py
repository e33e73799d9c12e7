"""`llmhost encrypt` / `decrypt` and serving an encrypted model with no plaintext left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from llmhost.store.in_memory import MEMORY_FS, filesystem_type
from tests.e2e.conftest import Server, free_port


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_encrypt_decrypt_round_trip_and_refusals(tiny_model, tmp_path):
    key = tmp_path / "model.key"
    enc = tmp_path / "m.gguf.enc"
    p = cli("encrypt", str(tiny_model.gguf), "--out", str(enc), "--new-key", str(key))
    assert p.returncode == 0, p.stderr
    assert "GB/s" in p.stdout and oct(key.stat().st_mode & 0o777) == "0o600"
    back = tmp_path / "back.gguf"
    p = cli("decrypt", str(enc), "--out", str(back), "--key-file", str(key))
    assert p.returncode == 0, p.stderr
    assert back.read_bytes() == tiny_model.gguf.read_bytes()
    # wrong key, tampered file, loose key permissions: one clear line each, no output file
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    p = cli("decrypt", str(enc), "--out", str(tmp_path / "x"), "--key-file", str(other))
    assert p.returncode == 1 and "wrong key" in p.stderr and "Traceback" not in p.stderr
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x40
    (tmp_path / "t.enc").write_bytes(bytes(data))
    p = cli(
        "decrypt", str(tmp_path / "t.enc"), "--out", str(tmp_path / "y"), "--key-file", str(key)
    )
    assert p.returncode == 1 and "failed authentication" in p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    key.chmod(0o644)
    p = cli("decrypt", str(enc), "--out", str(tmp_path / "z"), "--key-file", str(key))
    assert p.returncode == 2 and "chmod 600" in p.stderr
    p = cli("encrypt", str(enc), "--key-file", str(other))
    assert p.returncode == 2 and "already encrypted" in p.stderr


def test_serve_encrypted_model_leaves_no_plaintext(tiny_model, tmp_path, shm):
    key_hex = "11" * 32
    enc = tmp_path / "models" / "secret.gguf.enc"
    enc.parent.mkdir()
    p = cli("encrypt", str(tiny_model.gguf), "--out", str(enc), env={"LLMHOST_MODEL_KEY": key_hex})
    assert p.returncode == 0, p.stderr
    os.environ["LLMHOST_DECRYPT_DIR"] = str(shm)
    os.environ["LLMHOST_MODEL_KEY"] = key_hex
    try:
        srv = Server(tmp_path, str(enc), "--parallel", "2")
        try:
            info = srv.wait_ready()
            assert info["model"] == "secret"
            assert list(shm.iterdir()) == []
            r = httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True},
                timeout=10,
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        finally:
            assert srv.stop() == 0
        assert list(shm.iterdir()) == []
        plain = tiny_model.gguf.read_bytes()[:4096]
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.suffix != ".log":
                assert plain not in path.read_bytes()[:8192] or path == tiny_model.gguf, path
        # the wrong key: the server says why and exits non-zero, still leaving nothing behind
        os.environ["LLMHOST_MODEL_KEY"] = "22" * 32
        p = subprocess.run(
            [sys.executable, "-m", "llmhost", "serve", str(enc), "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 1 and "wrong key" in p.stderr
        assert list(shm.iterdir()) == []
        # a decrypt folder on a disk is refused before a byte is decrypted into it
        disk = tmp_path / "on-disk"
        disk.mkdir()
        fstype = filesystem_type(disk)
        if fstype not in MEMORY_FS:
            os.environ["LLMHOST_MODEL_KEY"] = key_hex
            port = str(free_port())
            p = subprocess.run(
                [sys.executable, "-m", "llmhost", "serve", str(enc), "--port", port],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "LLMHOST_DECRYPT_DIR": str(disk), "COLUMNS": "300"},
            )
            assert p.returncode == 2, p.stderr
            assert f"{disk} is on {fstype}" in " ".join(p.stderr.split()), p.stderr
            assert list(disk.iterdir()) == []
    finally:
        os.environ.pop("LLMHOST_DECRYPT_DIR", None)
        os.environ.pop("LLMHOST_MODEL_KEY", None)
