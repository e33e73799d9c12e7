"""A real `llmhost serve` subprocess on a free port for the e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require

require("llama_cpp")

CTX = 8192  # long enough that an abandoned stream would keep the engine busy for seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, timeout: float = 60) -> None:
    """Poll `url`/ready until it answers 200 (a server started in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} was not ready within {timeout} s")


class Server:
    def __init__(self, home: Path, *args: str, auth: bool = False):
        self.port = free_port()
        self.verify: bool | str = True
        scheme = "http"
        if "--ssl-certfile" in args:
            scheme, self.verify = "https", args[args.index("--ssl-certfile") + 1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        env = {**os.environ, "LLMHOST_HOME": str(home)}
        cmd = [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            "--port",
            str(self.port),
            "--threads",
            "2",
            *args,
            *([] if auth else ["--no-auth"]),
        ]
        self.log = home / "server.log"
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2, verify=self.verify)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stats(self) -> dict:
        return httpx.get(self.url + "/ready", timeout=5).json()["stats"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(
        tmp_path_factory.mktemp("home"), "--demo", "--parallel", "8", "--ctx-size", str(CTX)
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def watched_page(browser, timeout_ms: int):
    """A new Playwright page that waits up to `timeout_ms`, and the list its console errors
    and page errors are written to ("url: text"), for a test to check (CSP violations, say)."""
    page = browser.new_page()
    page.set_default_timeout(timeout_ms)
    problems: list[str] = []

    def on_console(m) -> None:
        if m.type == "error":
            problems.append(f"{m.location.get('url')}: {m.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return page, problems
