"""A real browser (headless Chromium) on another origin calls a real `llmhost serve` (tiny real
model, authentication on) with fetch(): from an origin in --cors-origins it streams a chat
completion and reads the request id; from any other origin the browser refuses the fetch.

The page posts what it saw back to its own server rather than the test reading it from
`--dump-dom`: with a streamed body Chromium may dump the page before the script is done."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llmhost.audit.store import SqliteAuditStore
from llmhost.security.auth import KeyStore
from tests.conftest import require_exe
from tests.e2e.conftest import Server

# The page's script: one streamed chat completion read chunk by chunk, then a request without
# a key (a 401 the page can still read); what it saw goes into the page and to POST /result.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>llmhost cors</title></head><body>
<pre id="out">pending</pre>
<script>
const API = %(api)s, KEY = %(key)s;
(async () => {
  const out = {};
  try {
    const r = await fetch(API + "/v1/chat/completions", {
      method: "POST",
      headers: {Authorization: "Bearer " + KEY, "Content-Type": "application/json"},
      body: JSON.stringify({
        messages: [{role: "user", content: "Hello"}],
        max_tokens: 8, ignore_eos: true, stream: true,
      }),
    });
    out.status = r.status;
    out.requestId = r.headers.get("x-request-id");
    out.rateLimit = r.headers.get("x-ratelimit-limit");
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", text = "", chunks = 0, done = false;
    for (;;) {
      const {value, done: end} = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { done = true; continue; }
        chunks += 1;
        for (const choice of JSON.parse(data).choices || []) {
          text += (choice.delta && choice.delta.content) || "";
        }
      }
    }
    Object.assign(out, {text, chunks, done});
  } catch (e) {
    out.error = String(e);
  }
  try {
    const r = await fetch(API + "/v1/models");
    out.noKey = {status: r.status, type: (await r.json()).error.type};
  } catch (e) {
    out.noKey = {error: String(e)};
  }
  document.getElementById("out").textContent = JSON.stringify(out);
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});  // same origin
})();
</script></body></html>
"""


@contextmanager
def page_server(pages: dict[str, bytes], results: queue.Queue) -> Iterator[str]:
    """A static server on its own port (so its own origin) serving `pages` by path; what a
    page posts to /result lands in `results`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(204)
            self.end_headers()
            if self.path == "/result":
                results.put(json.loads(data))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def page_outcome(chromium: str, url: str, profile: Path, results: queue.Queue) -> dict:
    """Open `url` in headless Chromium and return what its script posted back."""
    log = profile.with_suffix(".log")
    browser = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,  # its own process group: the renderers go with it
    )
    try:
        return results.get(timeout=30)
    except queue.Empty:
        raise AssertionError(f"the page posted nothing: {log.read_text()[-3000:]}") from None
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()


def test_browser_on_an_allowed_origin_streams_and_others_are_refused(tiny_model, tmp_path):
    chromium = require_exe("chromium", "chromium")
    home = tmp_path / "home"
    home.mkdir()
    keys = KeyStore(home / "keys.db")
    key, _ = keys.create("browser", rpm=60)
    keys.close()
    pages: dict[str, bytes] = {}
    results: queue.Queue = queue.Queue()
    with page_server(pages, results) as allowed, page_server(pages, results) as other:
        srv = Server(
            home, str(tiny_model.gguf), "--cors-origins", allowed, "--ctx-size", "512", auth=True
        )
        try:
            script = {"api": json.dumps(srv.url), "key": json.dumps(key)}
            pages["/page.html"] = (PAGE % script).encode()
            srv.wait_ready()
            page = "/page.html"
            ok = page_outcome(chromium, allowed + page, tmp_path / "allowed", results)
            refused = page_outcome(chromium, other + page, tmp_path / "other", results)
        finally:
            assert srv.stop() == 0, srv.log.read_text()[-3000:]
    assert "error" not in ok, ok
    assert ok["status"] == 200 and ok["done"] and ok["chunks"] > 0 and ok["text"], ok
    # headers the page may read only because the server exposes them
    assert len(ok["requestId"]) >= 16 and ok["rateLimit"] == "60", ok
    assert ok["noKey"] == {"status": 401, "type": "authentication_error"}, ok
    # the browser refused both: the POST's preflight granted nothing, so the POST was never
    # sent, and the GET's 401 carried no Access-Control-Allow-Origin
    assert refused["error"] == "TypeError: Failed to fetch", refused
    assert refused["noKey"] == {"error": "TypeError: Failed to fetch"}, refused
    store = SqliteAuditStore(home / "audit.db")
    try:
        statuses = sorted(r.status for r in store.search() if r.route == "/v1/chat/completions")
    finally:
        store.close()
    assert statuses == [200], statuses
