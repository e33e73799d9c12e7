"""The store commands as a user runs them: pull (killed with -9 and resumed), verify, list,
encrypt by name, and `llmhost serve name:tag`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Server
from tests.fileserver import serve

MB = 1 << 20


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "LLMHOST_HOME": str(home)},
    )


def test_pull_survives_kill_9_and_resumes_without_refetching(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(24 * MB)
    (root / "big.dat").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    home = tmp_path / "home"
    with serve(root, throttle=3 * MB) as srv:
        args = ["pull", f"{srv.url}/big.dat", "--name", "big:v1", "-x", "4", "-q"]
        args += ["--sha256", sha]
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmhost", *args],
            env={**os.environ, "LLMHOST_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while srv.sent.get("/big.dat", 0) < 10 * MB and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # let one state save happen after the bytes counted above
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = srv.sent["/big.dat"]
        state = next((home / "models" / ".partial").rglob("big.dat.part.json"))
        kept = sum(d for _, _, d in json.loads(state.read_text())["segments"])
        # at most half a second of bytes per stream was not yet recorded
        assert kept >= first - 4 * (3 * MB // 2 + MB), (first, kept)
        assert cli(home, "list", "--json").stdout.strip() == "[]"  # nothing registered yet
        p = cli(home, *args)
        assert p.returncode == 0, p.stderr
        second = srv.sent["/big.dat"] - first
    # re-fetched beyond what was missing: only what was in flight when a range was split
    # between streams (well under one segment per stream)
    assert second <= len(data) - kept + 1 + 4 * (256 << 10), (kept, second)
    assert "pulled big:v1" in p.stdout
    listed = json.loads(cli(home, "list", "--json").stdout)
    assert [(m["name"], m["tag"], m["files"][0]["sha256"]) for m in listed] == [("big", "v1", sha)]


def test_store_commands_and_serving_a_stored_encrypted_model(tiny_model, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(tiny_model.gguf, root / "tiny.gguf")
    home = tmp_path / "home"
    with serve(root) as srv:
        p = cli(home, "pull", f"{srv.url}/tiny.gguf", "--name", "tiny:v1")
        assert p.returncode == 0, p.stderr
        bad = cli(home, "pull", f"{srv.url}/missing.gguf")
        assert bad.returncode == 1 and "404" in bad.stderr and "Traceback" not in bad.stderr
        evil = cli(home, "pull", f"{srv.url}/tiny.gguf", "--name", "../x")
        assert evil.returncode == 1 and "invalid model name" in evil.stderr
    p = cli(home, "verify", "tiny:v1")
    assert p.returncode == 0 and p.stdout.startswith("ok:"), p.stderr
    assert cli(home, "tag", "tiny:v1", "tiny:prod").returncode == 0
    assert cli(home, "promote", "tiny:prod", "--channel", "stable").returncode == 0
    show = json.loads(cli(home, "show", "tiny:prod").stdout)
    assert show["channel"] == "stable" and show["format"] == "gguf"
    key = tmp_path / "k"
    p = cli(home, "encrypt", "tiny:prod", "--new-key", str(key))
    assert p.returncode == 0, p.stderr
    folder = Path(show["path"])
    assert [f.name for f in folder.iterdir() if f.is_file() and "gguf" in f.name] == [
        "tiny.gguf.enc"
    ]
    assert cli(home, "verify", "tiny:prod").returncode == 0
    # tampering is caught by verify, with one clear line
    enc = folder / "tiny.gguf.enc"
    saved = enc.read_bytes()
    blob = bytearray(saved)
    blob[1000] ^= 1
    enc.write_bytes(bytes(blob))
    p = cli(home, "verify", "tiny:prod")
    assert p.returncode == 1 and "sha256" in p.stderr and "Traceback" not in p.stderr
    enc.write_bytes(saved)
    srv = Server(home, "tiny@stable", "--key-file", str(key), "--parallel", "2")
    try:
        srv.wait_ready()
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny:stable"]
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"model": "tiny:stable", "prompt": "hi", "max_tokens": 4, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert srv.stop() == 0
    assert cli(home, "rm", "tiny:v1").returncode == 0
    assert [m["tag"] for m in json.loads(cli(home, "list", "--json").stdout)] == ["prod"]
