"""Blue-green drills on the tiny model behind a real router, under a steady 20 req/s of mixed
streaming and non-streaming requests: a switch loses no request and cuts no stream; a green
that fails its smoke test never gets traffic; a green whose errors breach the guard after
the switch is rolled back automatically."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import Server, free_port
from tests.e2e.test_router import TOKEN, Router, steady_load

pytestmark = pytest.mark.slow


def load_in_background(url: str, seconds: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        out.update(asyncio.run(steady_load(url, 20, seconds)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def deploy(home, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMHOST_HOME": str(home), "LLMHOST_ROUTER_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "llmhost", "deploy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def stack(tiny_model, tmp_path):
    (tmp_path / "blue").mkdir()
    blue = Server(tmp_path / "blue", str(tiny_model.gguf), "--parallel", "4", "--threads", "1")
    blue.wait_ready()
    reaper = threading.Thread(target=blue.proc.wait, daemon=True)  # reap it when it stops
    reaper.start()
    green_port = free_port()
    router = Router(tmp_path, f"blue={blue.url}", f"green=http://127.0.0.1:{green_port}")
    home = tmp_path / "deploy"
    home.mkdir()
    p = deploy(
        home,
        "init",
        "--router",
        router.url,
        "--blue-port",
        str(blue.port),
        "--green-port",
        str(green_port),
        "--live-pid",
        str(blue.proc.pid),
    )
    assert p.returncode == 0, p.stderr
    yield blue, router, home
    router.stop()
    state = json.loads((home / "deploy.json").read_text())
    for colour in state["colours"].values():  # the colour a deploy left live
        if colour["pid"] and colour["pid"] != blue.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(colour["pid"], 15)
    if blue.proc.poll() is None:
        blue.stop()


SERVE = "--parallel 4 --threads 1 --no-auth"


def test_switch_under_load_loses_nothing(stack, tiny_model):
    blue, router, home = stack
    thread, result = load_in_background(router.url, 30)
    time.sleep(3)
    p = deploy(
        home,
        "start",
        "--model",
        str(tiny_model.gguf),
        "--serve-args",
        SERVE,
        "--steps",
        "0.5,1",
        "--step-seconds",
        "3",
        "--watch",
        "5",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "green is live" in p.stderr
    thread.join(timeout=120)
    assert result["total"] == 600 and result["ok"] == 600, result  # 0 failed, no stream cut
    st = router.status()
    assert st["green"]["weight"] == 1 and st["blue"]["weight"] == 0
    assert st["green"]["requests"] > 50
    # the old colour was stopped gracefully by the deploy
    deadline = time.monotonic() + 30
    while blue.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blue.proc.returncode == 0
    status = json.loads(deploy(home, "status").stdout)
    assert status["live"] == "green" and status["history"][-1]["event"] == "live"


def test_bad_green_never_gets_traffic(stack, tmp_path):
    _blue, router, home = stack
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    thread, result = load_in_background(router.url, 12)
    p = deploy(
        home, "start", "--model", str(broken), "--serve-args", SERVE, "--ready-timeout", "60"
    )
    thread.join(timeout=60)
    assert p.returncode != 0 and "failed its smoke test" in p.stderr, p.stderr
    st = router.status()
    assert st["green"]["requests"] == 0 and st["green"]["weight"] == 0
    assert result["ok"] == result["total"], result
    assert json.loads(deploy(home, "status").stdout)["live"] == "blue"


def test_green_breaching_errors_is_rolled_back(stack, tiny_model, tmp_path):
    _blue, router, home = stack
    thread, _result = load_in_background(router.url, 40)
    time.sleep(2)
    env = {**os.environ, "LLMHOST_HOME": str(home), "LLMHOST_ROUTER_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmhost",
            "deploy",
            "start",
            "--model",
            str(tiny_model.gguf),
            "--watch",
            "15",
            "--serve-args",
            SERVE,
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "traffic: 100% to green" in line:
            # green dies after the switch: its requests fail, the guard must roll back
            pid = json.loads(deploy(home, "status").stdout)["colours"]["green"]["pid"]
            os.kill(pid, 9)
            break
    _rest, _ = proc.communicate(timeout=120)
    err = "".join(lines) + proc.stderr.read() if proc.stderr and not proc.stderr.closed else ""
    assert proc.returncode != 0, "".join(lines)
    status = json.loads(deploy(home, "status").stdout)
    assert status["live"] == "blue" and status["history"][-1]["event"] == "rolled-back", err
    st = router.status()
    assert st["blue"]["weight"] == 1 and st["green"]["weight"] == 0
    assert status["colours"]["green"]["pid"] is None
    thread.join(timeout=120)
    # blue still serves
    r = httpx.post(
        router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30
    )
    assert r.status_code == 200 and r.headers["x-llmhost-upstream"] == "blue"
