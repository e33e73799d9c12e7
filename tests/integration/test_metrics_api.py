"""/metrics through the app with the scripted engine: request counts by route, model and
status, TTFT/TPOT, tokens, 401 and 429 counters, label hygiene, and protection by config."""

from __future__ import annotations

import asyncio
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore


def parse(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(found: dict, name: str, **labels) -> float:
    return sum(
        s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
    )


async def started(app):
    while not app.state.ready:
        await asyncio.sleep(0.01)


async def test_requests_latency_tokens_and_labels(tmp_path):
    engine = FakeEngine(model_id="fake", script=["a", " b", " c", " d"])
    settings = Settings(home=tmp_path, auth=False, rate_limit_rps=0)
    app = create_app(engine, settings)
    async with app.router.lifespan_context(app):
        await started(app)
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
            for _ in range(3):
                r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
                assert r.status_code == 200
            r = await c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "max_tokens": 4,
                },
            )
            assert r.status_code == 200 and "[DONE]" in r.text
            assert (await c.post("/v1/completions", json={"max_tokens": -1})).status_code == 400
            for path in ("/wp-login.php", "/etc/passwd", "/v1/nope"):
                assert (await c.get(path)).status_code == 404
            r = await c.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            found = parse(r.text)
    assert (
        total(found, "llmhost_requests_total", route="/v1/completions", status="200", model="fake")
        == 3
    )
    assert total(found, "llmhost_requests_total", route="/v1/chat/completions", status="200") == 1
    assert total(found, "llmhost_requests_total", route="/v1/completions", status="400") == 1
    # unknown paths share one label value instead of one time series each
    assert total(found, "llmhost_requests_total", route="other", status="404") == 3
    routes = {s.labels["route"] for s in found["llmhost_requests_total"]}
    assert routes <= {"/v1/completions", "/v1/chat/completions", "other"}
    assert (
        total(
            found, "llmhost_request_duration_seconds_count", route="/v1/completions", stream="false"
        )
        == 4
    )
    assert (
        total(
            found,
            "llmhost_request_duration_seconds_count",
            route="/v1/chat/completions",
            stream="true",
        )
        == 1
    )
    assert total(found, "llmhost_time_to_first_token_seconds_count", model="fake") == 4
    assert total(found, "llmhost_time_per_output_token_seconds_count", model="fake") == 4
    assert total(found, "llmhost_completion_tokens_total", model="fake") == 16
    assert total(found, "llmhost_prompt_tokens_total", model="fake") > 0
    assert total(found, "llmhost_engine_up") == 1
    assert total(found, "llmhost_http_requests_in_flight") == 0
    assert total(found, "llmhost_gpu_count") >= 0
    # the audit writer reports what it stored (a graceful stop drains it first)
    assert "llmhost_audit_queue_length" in found


async def test_auth_failures_rate_limits_and_protected_metrics(tmp_path):
    settings = Settings(home=tmp_path, audit=False, rate_limit_rps=0, metrics_auth=True)
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create("alice", rpm=2)
    keys.close()
    app = create_app(FakeEngine(script=["x"]), settings)
    auth = {"Authorization": f"Bearer {key}"}
    async with app.router.lifespan_context(app):
        await started(app)
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 401
            assert (
                await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            ).status_code == 401
            codes = [(await c.get("/v1/models", headers=auth)).status_code for _ in range(2)]
            assert codes == [200, 200]
            r = await c.get("/metrics", headers=auth)  # the third request of this minute
            assert r.status_code == 429
            assert (await c.get("/health")).status_code == 200
    found = parse(app.state.metrics.render().decode())
    assert total(found, "llmhost_auth_failures_total") == 2
    assert total(found, "llmhost_rate_limit_rejections_total", limit="user_requests") == 1
    assert total(found, "llmhost_requests_total", status="401") == 2
    assert total(found, "llmhost_requests_total", status="429") == 1


async def test_metrics_off_or_on_another_port(tmp_path):
    app = create_app(FakeEngine(), Settings(home=tmp_path, auth=False, metrics=False))
    async with app.router.lifespan_context(app):
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 404
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(home=tmp_path, auth=False, audit=False, metrics_port=port)
    app = create_app(FakeEngine(), settings)
    async with app.router.lifespan_context(app):
        await started(app)
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200 and "llmhost_build_info" in r.text
    # the side server is gone with the app
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
        raise AssertionError("metrics port still open")
    except httpx.TransportError:
        pass
