"""Screenshots of the console's pages for the README (docs/console/*.png): a real
`llmhost serve` of the demo model with authentication on, an admin and a user key, a few
requests from the user so the charts, usage and audit pages have something to show, then
the system Chromium through Playwright.

    .venv/bin/python scripts/console_screenshots.py            # writes docs/console/*.png
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

from llmhost.security.auth import KeyStore
from llmhost.security.quota import Quota
from llmhost.store.demo import ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "console"
PAGES = ("overview", "usage", "keys", "audit", "playground", "sessions")
ROUTER_TOKEN = "router-token-for-screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    model = str(ensure_demo_model(home / "models"))  # --demo would turn authentication off
    return start(home, ["serve", model, "--port", str(port)], port)


def start(home: Path, args: list[str], port: int) -> subprocess.Popen[bytes]:
    """`llmhost ARGS` with its home in `home`, once its /ready answers 200."""
    env = {**os.environ, "LLMHOST_HOME": str(home), "LLMHOST_ROUTER_TOKEN": ROUTER_TOKEN}
    cmd = [sys.executable, "-m", "llmhost", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"llmhost {args[0]} did not become ready")


def traffic(url: str, user: str) -> None:
    auth = {"Authorization": f"Bearer {user}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as c:
        for i in range(12):
            body = {
                "messages": [{"role": "user", "content": f"Say something about ports, take {i}"}],
                "max_tokens": 24,
            }
            c.post("/v1/chat/completions", json=body).raise_for_status()
            time.sleep(0.5)


def logged_in(p: Any, chromium: str, url: str, secret: str) -> tuple[Any, Any]:
    """Chromium (to close when done) and a page logged in to the console at `url`."""
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(url + "/console/login")
    page.fill("input[name=key]", secret)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/console")
    return browser, page


def shoot(url: str, admin: str, chromium: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = logged_in(p, chromium, url, admin)
        page.wait_for_timeout(6000)  # a chart sample or two after the traffic
        for name in PAGES:
            path = "/console" if name == "overview" else f"/console/{name}"
            page.goto(url + path + ("?group_by=user" if name == "usage" else ""))
            if name == "playground":
                page.fill("#message", "Which port does the server listen on?")
                page.fill("#max-tokens", "48")
                page.fill("#temperature", "0.7")
                page.click("#send")
                page.wait_for_selector("#status:text('done')", timeout=120_000)
            page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
            print(OUT / f"{name}.png")
        browser.close()


def shoot_fleet(home: Path, blue: str, user: str, chromium: str) -> None:
    """The router's console over the demo server (blue) and a second replica (green, on the
    test engine) after some traffic through the router."""
    (home / "green").mkdir()
    green_port, port = free_port(), free_port()
    green = start(
        home / "green", ["serve", "--engine", "fake", "--port", str(green_port)], green_port
    )
    url = f"http://127.0.0.1:{port}"
    router = start(
        home,
        [
            "router",
            "-u",
            f"blue={blue}",
            "-u",
            f"green=http://127.0.0.1:{green_port}",
            "--port",
            str(port),
        ],
        port,
    )
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(3):
                for i in range(8):
                    body = {"prompt": f"take {i}", "max_tokens": 8}
                    c.post(
                        "/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"}
                    )
                time.sleep(5)
        with sync_playwright() as p:
            browser, page = logged_in(p, chromium, url, ROUTER_TOKEN)
            page.screenshot(path=str(OUT / "fleet.png"), full_page=True)
            print(OUT / "fleet.png")
            browser.close()
    finally:
        for proc in (router, green):
            proc.terminate()
            proc.wait(timeout=60)


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        keys = KeyStore(home / "keys.db")
        admin, _ = keys.create("ops", "admin")
        user, _ = keys.create("alice", "user", rpm=600)
        keys.create("batch-jobs", "user", quota=Quota(tokens_per_day=2_000_000))
        keys.close()
        port = free_port()
        proc = serve(home, port)
        try:
            url = f"http://127.0.0.1:{port}"
            traffic(url, user)
            shoot(url, admin, chromium)
            shoot_fleet(home, url, user, chromium)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
