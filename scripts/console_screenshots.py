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

import httpx
from playwright.sync_api import sync_playwright

from llmhost.security.auth import KeyStore
from llmhost.security.quota import Quota
from llmhost.store.demo import ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "console"
PAGES = ("overview", "usage", "keys", "audit", "playground")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LLMHOST_HOME": str(home)}
    model = str(ensure_demo_model(home / "models"))  # --demo would turn authentication off
    cmd = [sys.executable, "-m", "llmhost", "serve", model, "--port", str(port)]
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
    raise SystemExit("the demo server did not become ready")


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


def shoot(url: str, admin: str, chromium: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url + "/console/login")
        page.fill("input[name=key]", admin)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/console")
        page.wait_for_timeout(6000)  # a chart sample or two after the traffic
        for name in PAGES:
            path = "/console" if name == "overview" else f"/console/{name}"
            page.goto(url + path + ("?group_by=user" if name == "usage" else ""))
            if name == "playground":
                page.fill("#message", "Which port does the server listen on?")
                page.fill("#max-tokens", "48")
                page.click("#send")
                page.wait_for_selector("#status:text('done')", timeout=120_000)
            page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
            print(OUT / f"{name}.png")
        browser.close()


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
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
