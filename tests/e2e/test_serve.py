"""A real `llmhost serve --demo` subprocess on a free port, driven with the official openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.e2e.conftest import CTX, Server, free_port

openai = require("openai")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_demo_model_was_built_in_home(server):
    assert (Path(server.log).parent / "models" / "demo" / "llmhost-demo.gguf").is_file()


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["llmhost-demo"]
    # the SDK's retrieve, with the time the model was loaded as `created`
    model = client.models.retrieve("llmhost-demo")
    assert model.id == "llmhost-demo" and model.created == models.data[0].created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion(client):
    r = client.completions.create(
        model="llmhost-demo",
        prompt="The quick brown fox",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    again = client.completions.create(
        model="llmhost-demo",
        prompt="The quick brown fox",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == r.choices[0].text


def test_completion_stream(client):
    chunks = list(
        client.completions.create(
            model="llmhost-demo",
            prompt="Hello",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 10
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(
        model="llmhost-demo",
        prompt="Hello",
        max_tokens=10,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert isinstance(text, str) and whole.usage.completion_tokens == 10


def test_chat(client):
    r = client.chat.completions.create(
        model="llmhost-demo",
        max_tokens=8,
        temperature=0,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 8


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model="llmhost-demo",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Write a poem."}],
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sdk_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="llmhost-demo", prompt="x", max_tokens=CTX * 2)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llmhost-demo", messages=[], max_tokens=1)


def test_eight_concurrent_streams(server):
    async def one(c, i: int, n: int) -> tuple[int, int]:
        stream = await c.chat.completions.create(
            model="llmhost-demo",
            max_tokens=n,
            stream=True,
            stream_options={"include_usage": True},
            seed=i,
            messages=[{"role": "user", "content": f"Request number {i}"}],
            extra_body={"ignore_eos": True},
        )
        deltas, usage = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                deltas += 1
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return usage, deltas

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            asks = [16 + 8 * i for i in range(8)]
            got = await asyncio.gather(*(one(c, i, n) for i, n in enumerate(asks)))
            return asks, got

    asks, got = asyncio.run(main())
    for n, (usage, deltas) in zip(asks, got, strict=True):
        assert usage == n
        assert deltas >= 1


def test_client_disconnect_frees_the_engine(server):
    body = {
        "model": "llmhost-demo",
        "prompt": "Go on",
        "max_tokens": CTX - 100,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=30) as h,
        h.stream("POST", server.url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        while got < 5:
            if next(lines).startswith("data: "):
                got += 1
        assert server.stats()["running"] == 1
    t0 = time.monotonic()
    while server.stats()["running"] != 0:
        assert time.monotonic() - t0 < 1.0, "the abandoned stream kept running"
        time.sleep(0.02)
    steps = server.stats()["steps"]
    time.sleep(0.2)
    assert server.stats()["steps"] == steps  # nothing decoding any more
    t0 = time.monotonic()
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "next", "max_tokens": 5, "ignore_eos": True},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert time.monotonic() - t0 < 2


def test_sigterm_finishes_inflight_stream_then_exits(tmp_path):
    srv = Server(tmp_path, "--demo", "--parallel", "2", "--ctx-size", str(CTX))
    try:
        srv.wait_ready()
        body = {
            "prompt": "Go",
            "max_tokens": 3000,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        with (
            httpx.Client(timeout=30) as h,
            h.stream("POST", srv.url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert '"completion_tokens":3000' in [ln for ln in rest if ln.startswith("data: {")][-1]
        assert srv.proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()


def test_bad_model_path_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "LLMHOST_HOME": str(tmp_path)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            str(tmp_path / "none.gguf"),
            "--port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert "model not found" in p.stderr and "Traceback" not in p.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "serve", str(junk), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert "not a GGUF file" in p.stderr and "Traceback" not in p.stderr


def test_full_queue_answers_503_with_retry_after(tmp_path):
    srv = Server(tmp_path, "--demo", "--parallel", "1", "--max-queue", "0", "--ctx-size", str(CTX))
    try:
        srv.wait_ready()
        body = {"prompt": "Go", "max_tokens": CTX - 100, "stream": True, "ignore_eos": True}
        with (
            httpx.Client(timeout=30) as h,
            h.stream("POST", srv.url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the stream
            next(lines)
            assert srv.stats()["running"] == 1  # the only sequence is now busy
            t0 = time.monotonic()
            busy = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert time.monotonic() - t0 < 1.0, busy.text  # refused at once, not queued
            assert srv.stats()["running"] == 1
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "overloaded"
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        assert srv.stop() == 0
