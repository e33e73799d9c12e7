"""`llmhost serve` refuses a stored model that `llmhost verify` would refuse: a flipped byte
(plain or encrypted), a changed size, weight files the manifest does not list; once the files
are whole again, `verify` and `serve` both accept it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Server, free_port
from tests.fileserver import serve as file_server


def cli(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMHOST_HOME": str(home), "COLUMNS": "300", **(env or {})},
    )


def serve_refused(home: Path, *args: str, env: dict | None = None) -> str:
    port = str(free_port())
    t0 = time.monotonic()
    p = cli(home, "serve", *args, "--port", port, "--no-auth", env=env)
    assert p.returncode == 1, p.stderr
    assert time.monotonic() - t0 < 30  # refused at once, not after loading
    assert "Traceback" not in p.stderr
    return " ".join(p.stderr.split())


def flip(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def answers(srv: Server) -> None:
    srv.wait_ready()
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text


def test_serve_refuses_what_verify_refuses(tiny_model, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(tiny_model.gguf, www / "tiny.gguf")
    home = tmp_path / "home"
    with file_server(www) as srv:
        assert cli(home, "pull", f"{srv.url}/tiny.gguf", "--name", "tiny:v1").returncode == 0
    folder = home / "models" / "tiny" / "v1"
    gguf = folder / "tiny.gguf"
    saved = gguf.read_bytes()

    # a flipped byte deep in the tensor data: llama.cpp would load it without a word
    flip(gguf, len(saved) - 100)
    assert cli(home, "verify", "tiny:v1").returncode == 1
    for target in ("tiny:v1", str(folder), str(gguf)):
        out = serve_refused(home, target)
        assert "does not match its manifest" in out and "tiny.gguf: sha256" in out, out
    # `--verify-on-load size` skips the hash, never the size
    with gguf.open("ab") as f:
        f.write(b"\0")
    out = serve_refused(home, "tiny:v1", "--verify-on-load", "size")
    assert f"tiny.gguf: {len(saved) + 1} bytes, the manifest says {len(saved)}" in out, out

    # whole again: verify passes (and stamps it), serve loads and answers
    gguf.write_bytes(saved)
    p = cli(home, "verify", "tiny:v1")
    assert p.returncode == 0, p.stderr
    assert (folder / ".verified.json").is_file()
    srv = Server(home, "tiny:v1", "--parallel", "1")
    try:
        answers(srv)
    finally:
        assert srv.stop() == 0

    # an extra weight file would be what llama.cpp picks up from the folder
    shutil.copy(gguf, folder / "other.gguf")
    out = serve_refused(home, str(folder))
    assert "does not list (other.gguf)" in out, out
    (folder / "other.gguf").unlink()

    # encrypted: the manifest holds the ciphertext's sha256, checked before any key is used
    key = tmp_path / "key"
    assert cli(home, "encrypt", "tiny:v1", "--new-key", str(key)).returncode == 0
    enc = folder / "tiny.gguf.enc"
    flip(enc, enc.stat().st_size // 2)
    assert (folder / ".verified.json").is_file()  # stale: it was written for the plain files
    assert cli(home, "verify", "tiny:v1").returncode == 1
    assert not (folder / ".verified.json").exists()  # a failed verify takes the stamp away
    out = serve_refused(home, "tiny:v1", "--key-file", str(key))
    assert "tiny.gguf.enc: sha256" in out, out
    flip(enc, enc.stat().st_size // 2)
    assert cli(home, "verify", "tiny:v1").returncode == 0
    srv = Server(home, "tiny:v1", "--key-file", str(key), "--parallel", "1")
    try:
        answers(srv)
    finally:
        assert srv.stop() == 0
