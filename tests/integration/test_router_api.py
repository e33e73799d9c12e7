"""The router's own endpoints against hostile input: credentials in upstream URLs never shown,
status behind the admin token, weights bodies bounded and parsed safely, every failure an
OpenAI-style JSON error; and an upstream's own query key still reaches it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

from llmhost.api.router import (
    WEIGHTS_BODY_MAX,
    Pool,
    create_router_app,
    parse_upstream,
    redact_url,
)

TOKEN = "router-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SECRET_URL = "http://alice:s3cret-pass@127.0.0.1:9/v1base?api_key=sk-live-123&region=eu"


def is_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["message"] and body["type"]
    return body


def router(*urls: str, token: str | None = TOKEN, **kw) -> TestClient:
    pool = Pool([parse_upstream(u, i) for i, u in enumerate(urls)], check_every=60)
    return TestClient(create_router_app(pool, admin_token=token, **kw))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (SECRET_URL, "http://***@127.0.0.1:9/v1base?api_key=***&region=***"),
        ("https://tok@h.example/x?token=abc#frag", "https://***@h.example/x?token=***"),
        ("http://10.0.0.7:8000", "http://10.0.0.7:8000"),
        ("http://[::1]:8000/p?key=", "http://[::1]:8000/p?key=***"),
        ("http://a:b@c@host/", "http://***@host/"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_status_needs_the_token_and_never_shows_credentials():
    with router(f"a={SECRET_URL}") as c:
        is_error(c.get("/router/status"), 401)
        is_error(c.get("/router/status", headers={"Authorization": "Bearer wrong"}), 401)
        r = c.get("/router/status", headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["upstreams"][0]["url"] == redact_url(SECRET_URL)
        weights = c.put("/router/weights", json={"a": 2}, headers=ADMIN)
        assert weights.status_code == 200
        for text in (r.text, weights.text):
            assert "s3cret" not in text and "sk-live" not in text and "alice" not in text
    with router(f"a={SECRET_URL}", token=None) as c:  # no token: weights off, status public
        r = c.get("/router/status")
        assert r.status_code == 200 and "s3cret" not in r.text and "sk-live" not in r.text
        is_error(c.put("/router/weights", json={"a": 1}), 404)


def test_weights_bodies_deep_large_or_malformed_are_clean_client_errors():
    with router("a=http://127.0.0.1:9") as c:
        deep = b"[" * 100_000 + b"]" * 100_000
        assert is_error(c.put("/router/weights", content=deep, headers=ADMIN), 400)[
            "message"
        ].startswith("body must be JSON")
        huge = b"[" * WEIGHTS_BODY_MAX + b"]" * WEIGHTS_BODY_MAX
        assert is_error(c.put("/router/weights", content=huge, headers=ADMIN), 413)["code"] == (
            "request_too_large"
        )
        nested = b'{"a": ' * 5000 + b"1" + b"}" * 5000
        is_error(c.put("/router/weights", content=nested, headers=ADMIN), 400)
        is_error(c.put("/router/weights", content=b"\xff\xfe{", headers=ADMIN), 400)
        is_error(c.put("/router/weights", json={"a": "x"}, headers=ADMIN), 400)
        is_error(c.put("/router/weights", json={"zz": 1}, headers=ADMIN), 404)

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while streaming
            for _ in range(WEIGHTS_BODY_MAX // 1024 + 2):
                yield b" " * 1024

        is_error(c.put("/router/weights", content=chunks(), headers=ADMIN), 413)
        assert c.get("/router/status", headers=ADMIN).json()["upstreams"][0]["weight"] == 1.0


def test_proxied_bodies_are_bounded():
    with router("a=http://127.0.0.1:9", max_body=1024) as c:
        big = is_error(c.post("/v1/completions", content=b"x" * 2048), 413)
        assert big["code"] == "request_too_large"
        is_error(c.post("/v1/completions", content=b"{}"), 503)  # within the limit: no upstream


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("authorization")))
        body = json.dumps({"status": "ready"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_an_upstream_keeps_its_query_key_and_a_client_cannot_replace_it():
    handler = type("H", (_Recorder,), {"seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/base?key=up-secret"
        with router(f"a={url}") as c:
            r = c.get("/v1/models?key=client&limit=2")
            assert r.status_code == 200, r.text
            assert c.get("/router/status", headers=ADMIN).json()["upstreams"][0]["healthy"]
        paths = [p for p, _ in handler.seen]
        assert "/base/ready?key=up-secret" in paths
        assert "/base/v1/models?limit=2&key=up-secret" in paths
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_deploy_reads_the_status_with_its_token(tmp_path, monkeypatch):
    from llmhost.errors import DeployError
    from llmhost.ops import deploy

    with router("blue=http://127.0.0.1:9", "green=http://127.0.0.1:10") as c:

        def get(url: str, **kw):
            return c.get(url.removeprefix("http://router"), headers=kw.get("headers"))

        monkeypatch.setattr(deploy.httpx, "get", get)
        st = deploy.DeployState(router="http://router")
        good = deploy.Deployer(tmp_path / "d.json", admin_token=TOKEN)
        assert set(good._status(st)) == {"blue", "green"}
        with pytest.raises(DeployError, match="LLMHOST_ROUTER_TOKEN"):
            deploy.Deployer(tmp_path / "d.json", admin_token=None)._status(st)


def _model_upstream(name: str, ready: dict, models: list[str]):
    class H(BaseHTTPRequestHandler):
        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/ready"):
                self._json(ready)
            else:
                self._json(
                    {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}
                )

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            self._json({"served_by": name, "bytes": len(self.rfile.read(n))})

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_requests_go_to_an_upstream_that_serves_their_model():
    a = _model_upstream("a", {"status": "ready", "model": "m-a"}, ["m-a"])
    b = _model_upstream(
        "b", {"status": "ready", "models": [{"id": "m-b"}, {"id": "m-c"}]}, ["m-b", "m-c"]
    )
    try:
        urls = [f"{n}=http://127.0.0.1:{h.server_port}" for n, h in (("a", a), ("b", b))]
        with router(*urls) as c:
            for model, want in (("m-a", "a"), ("m-c", "b"), ("m-b", "b"), ("m-a", "a")):
                r = c.post("/v1/chat/completions", json={"model": model, "messages": []})
                assert r.status_code == 200 and r.json()["served_by"] == want, (model, r.text)
                assert r.headers["x-llmhost-upstream"] == want
            err = is_error(c.post("/v1/completions", json={"model": "m-z", "prompt": "x"}), 404)
            assert err["code"] == "model_not_found" and "m-a, m-b, m-c" in err["message"]
            assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 200
            assert c.post("/v1/completions", content=b"{not json").status_code == 200
            listed = c.get("/v1/models").json()
            assert sorted(m["id"] for m in listed["data"]) == ["m-a", "m-b", "m-c"]
            status = c.get("/router/status", headers=ADMIN).json()["upstreams"]
            assert [u["models"] for u in status] == [["m-a"], ["m-b", "m-c"]]
    finally:
        for h in (a, b):
            h.shutdown()
            h.server_close()
