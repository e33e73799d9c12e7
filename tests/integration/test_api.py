"""The HTTP API over httpx's ASGI transport with the scripted engine: happy paths, SSE format,
and every kind of bad input answered with a 4xx OpenAI error body."""

from __future__ import annotations

import json

import httpx
import pytest

from llmhost.api import create_app
from llmhost.engines.fake import FakeEngine
from tests.conftest import open_settings


@pytest.fixture
async def env():
    engine = FakeEngine(model_id="fake-model", script=["Hello", " world", "!"], context_length=64)
    app = create_app(engine, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, engine


def sse_events(resp: httpx.Response) -> list:
    events = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(resp: httpx.Response, status: int, fragment: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert {"message", "type", "code"} <= set(err)
    assert fragment.lower() in err["message"].lower(), err["message"]
    return err


async def test_health_ready_models(env):
    c, _ = env
    assert (await c.get("/health")).json() == {"status": "ok"}
    r = await c.get("/ready")
    assert r.status_code == 200 and r.json()["model"] == "fake-model"
    models = (await c.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert models["data"][0]["context_length"] == 64


async def test_retrieve_model_and_its_created_time(env):
    import time

    c, _ = env
    card = (await c.get("/v1/models")).json()["data"][0]
    assert 0 < time.time() - card["created"] < 60  # when it was loaded, not 0
    r = await c.get("/v1/models/fake-model")
    assert r.status_code == 200 and r.json() == card
    for other in ("other-model", "org/fake-model", "fake-model/x", "%00"):
        err = assert_error(await c.get(f"/v1/models/{other}"), 404, "does not exist")
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert (await c.get("/v1/models/")).status_code == 404


async def test_completion(env):
    c, engine = env
    r = await c.post(
        "/v1/completions",
        json={
            "model": "fake-model",
            "prompt": "a b",
            "max_tokens": 4,
            "temperature": 0,
            "seed": 7,
            "top_k": 5,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello world!Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    sp = engine.requests[-1].sampling
    assert (sp.temperature, sp.seed, sp.top_k, sp.max_tokens) == (0, 7, 5, 4)
    assert r.headers["x-request-id"]


async def test_completion_stream_with_usage(env):
    c, _ = env
    r = await c.post(
        "/v1/completions",
        json={
            "prompt": "a",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    usage = ev[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    text = "".join(e["choices"][0]["text"] for e in ev[:-2])
    assert text == "Hello world!"
    assert ev[-3]["choices"][0]["finish_reason"] == "length"


async def test_stream_without_usage_has_no_usage_chunk(env):
    c, _ = env
    ev = sse_events(
        await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True})
    )
    assert ev[-1] == "[DONE]"
    assert all("usage" not in e for e in ev[:-1])


async def test_chat(env):
    c, engine = env
    r = await c.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "max_completion_tokens": 2,
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    prompt = engine.requests[-1].prompt
    assert "<|im_start|>system\ns<|im_end|>" in prompt and prompt.endswith("assistant\n")


async def test_chat_stream(env):
    c, _ = env
    r = await c.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": ["!"],
        },
    )
    ev = sse_events(r)
    assert ev[0]["object"] == "chat.completion.chunk"
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-2])
    assert content == "Hello world"
    assert ev[-3]["choices"][0]["finish_reason"] == "stop"
    assert ev[-2]["usage"]["completion_tokens"] == 3


async def test_generate_guide_interface(env):
    c, _ = env
    r = await c.post("/generate", json={"prompt": "a b c", "max_length": 5})
    assert r.status_code == 200, r.text
    # max_length counts the 3 prompt tokens too, as transformers' generate() does
    assert r.json()["text"] == "Hello world"
    assert r.json()["usage"]["completion_tokens"] == 2
    r = await c.post("/generate", json={"prompt": "a b c", "max_new_tokens": 1})
    assert r.json()["text"] == "Hello"
    assert_error(
        await c.post("/generate", json={"prompt": "a b c", "max_length": 3}), 400, "max_length"
    )


async def test_openapi_schema(env):
    c, _ = env
    spec = (await c.get("/openapi.json")).json()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/generate",
        "/health",
        "/ready",
    ):
        assert path in spec["paths"], path


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": 42}, 400, "prompt"),
        ("/v1/completions", {}, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "temperature": 9}, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "n": 200}, 400, "n"),
        ("/v1/completions", {"prompt": [], "n": 1}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a"] * 10_000}, 400, "10000 prompts"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 500}}, 400, "-100..100"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, 400, "not supported"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "echo"),
        ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "gpt-9"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 1000}, 400, "context length"),
        ("/v1/completions", {"prompt": "w " * 80}, 400, "context length"),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "role"),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "nope",
        ),
        ("/generate", {"max_length": 5}, 400, "prompt"),
        ("/generate", {"prompt": "a", "max_length": -1}, 400, "max_length"),
    ],
)
async def test_bad_input_is_a_clear_4xx(env, path, body, status, fragment):
    c, _ = env
    err = assert_error(await c.post(path, json=body), status, fragment)
    if status == 404:
        assert err["code"] == "model_not_found"


async def test_malformed_json(env):
    c, _ = env
    r = await c.post(
        "/v1/completions", content=b'{"prompt": "a", ', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "not valid JSON")
    r = await c.post(
        "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


async def test_context_error_is_code_tagged(env):
    c, _ = env
    err = assert_error(
        await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 500}), 400
    )
    assert err["code"] == "context_length_exceeded"


async def test_unknown_route_and_method(env):
    c, _ = env
    assert_error(await c.get("/v1/nothing"), 404)
    assert_error(await c.get("/v1/completions"), 405)


async def test_not_ready_is_503_with_retry_after():
    engine = FakeEngine()
    app = create_app(engine, open_settings())
    # no lifespan: the engine never loads
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/completions", json={"prompt": "a"})
        err = assert_error(r, 503, "loading")
        assert err["code"] == "engine_not_ready" and r.headers["retry-after"] == "5"
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/health")).status_code == 200


async def test_failed_load_reported_and_fatal_called():
    class Broken(FakeEngine):
        async def start(self):
            raise RuntimeError("weights are corrupt")

    called = []
    app = create_app(Broken(), open_settings(), on_fatal=lambda: called.append(True))
    async with app.router.lifespan_context(app):
        await app.state.loader
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.get("/ready")
            assert r.status_code == 503 and "corrupt" in r.json()["error"]
            assert_error(await c.post("/v1/completions", json={"prompt": "a"}), 503, "corrupt")
    assert called == [True]


async def test_request_id_is_echoed(env):
    c, _ = env
    r = await c.get("/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await c.get("/health", headers={"x-request-id": "bad id\twith junk"})
    assert r.headers["x-request-id"] != "bad id\twith junk"


async def test_unexpected_engine_failure_is_500_body(env):
    c, engine = env

    async def boom(request):
        raise ZeroDivisionError("bug")
        yield  # pragma: no cover

    engine.stream = boom
    transport = httpx.ASGITransport(app=c._transport.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c2:
        r = await c2.post("/v1/completions", json={"prompt": "a"})
    assert_error(r, 500, "internal server error")


async def test_cache_prompt_reaches_the_engine(env):
    c, engine = env
    for path, body in [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = await c.post(path, json={**body, "max_tokens": 2})
        assert r.status_code == 200 and engine.requests[-1].cache_prompt is True
        r = await c.post(path, json={**body, "max_tokens": 2, "cache_prompt": False})
        assert r.status_code == 200 and engine.requests[-1].cache_prompt is False
        r = await c.post(path, json={**body, "cache_prompt": "no"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_prompt"
