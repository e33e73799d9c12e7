"""The openai engine in front of a real llmhost on the tiny model: the openai SDK sees the
same greedy text through the gateway as from the upstream directly, streaming with usage,
upstream refusals keep their status, the gateway's own auth and audit apply, and an upstream
that goes away turns /ready to 503 and requests to a clear 503."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from llmhost.engines.openai_upstream import _error_for
from llmhost.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, RateLimited
from tests.conftest import require
from tests.e2e.conftest import Server, free_port


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    up_home = tmp_path_factory.mktemp("upstream")
    upstream = Server(
        up_home,
        str(tiny_model.gguf),
        "--parallel",
        "4",
        "--ctx-size",
        "256",
        "--model-name",
        "tiny",
    )
    upstream.wait_ready()
    home = tmp_path_factory.mktemp("front")
    env = {**os.environ, "LLMHOST_HOME": str(home)}
    key = subprocess.run(
        [sys.executable, "-m", "llmhost", "keys", "create", "--user", "alice"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    front = Server(
        home,
        "--engine",
        "openai",
        "--upstream-url",
        upstream.url + "/v1",
        "--model-name",
        "gateway-tiny",
        auth=True,
    )
    front.key = key
    front.home = home
    front.wait_ready()
    yield upstream, front
    front.stop()
    if upstream.proc.poll() is None:
        upstream.stop()


def test_same_text_through_the_gateway(pair):
    openai = require("openai")
    upstream, front = pair
    direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x")
    gw = openai.OpenAI(base_url=front.url + "/v1", api_key=front.key)
    assert [m.id for m in gw.models.list().data] == ["gateway-tiny"]
    msgs = [{"role": "user", "content": "Say something"}]
    a = direct.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    b = gw.chat.completions.create(
        model="gateway-tiny", messages=msgs, max_tokens=12, temperature=0
    )
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.completion_tokens == a.usage.completion_tokens > 0
    assert b.choices[0].finish_reason == a.choices[0].finish_reason
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    # streaming, with usage in the last chunk
    chunks = list(
        gw.completions.create(
            model="gateway-tiny",
            prompt="Once upon",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = direct.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_upstream_connections_are_reused(pair):
    upstream, front = pair
    headers = {"Authorization": f"Bearer {front.key}"}
    body = {"model": "gateway-tiny", "prompt": "hi", "max_tokens": 2, "stream": True}

    def closed_by_front() -> int:
        # the side that closes a TCP connection holds it in TIME_WAIT
        return sum(
            1
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_TIME_WAIT and c.raddr and c.raddr.port == upstream.port
        )

    before = closed_by_front()
    with httpx.Client(timeout=30) as client:
        for _ in range(12):
            with client.stream(
                "POST", front.url + "/v1/completions", json=body, headers=headers
            ) as r:
                assert r.status_code == 200
                r.read()
    assert closed_by_front() - before <= 1


def test_errors_auth_and_audit(pair):
    openai = require("openai")
    _upstream, front = pair
    gw = openai.OpenAI(base_url=front.url + "/v1", api_key=front.key)
    with pytest.raises(openai.BadRequestError, match="context"):
        gw.completions.create(model="gateway-tiny", prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        gw.completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=front.url + "/v1", api_key="wrong").models.list()
    env = {**os.environ, "LLMHOST_HOME": str(front.home)}
    out = subprocess.run(
        [sys.executable, "-m", "llmhost", "audit", "search", "--user", "alice", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert '"model": "gateway-tiny"' in out.stdout.replace('":"', '": "')


def test_upstream_gone(tiny_model, tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "f").mkdir()
    upstream = Server(tmp_path / "u", str(tiny_model.gguf), "--parallel", "2")
    upstream.wait_ready()
    front = Server(tmp_path / "f", "--engine", "openai", "--upstream-url", upstream.url)
    front.wait_ready()
    try:
        upstream.proc.send_signal(signal.SIGKILL)
        upstream.proc.wait()
        r = httpx.post(
            front.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
        deadline = time.monotonic() + 15
        while httpx.get(front.url + "/ready", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "still ready"
            time.sleep(0.3)
    finally:
        front.stop()


def test_upstream_must_exist(tmp_path):
    port = free_port()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            "--engine",
            "openai",
            "--upstream-url",
            f"http://127.0.0.1:{port}",
            "--port",
            str(free_port()),
            "--no-auth",
        ],
        env={**os.environ, "LLMHOST_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "does not answer" in p.stderr


def test_error_mapping():
    assert isinstance(
        _error_for(400, b'{"error": {"message": "maximum context length is 8"}}'),
        ContextLengthExceeded,
    )
    assert isinstance(_error_for(422, b"bad"), InvalidRequest)
    assert isinstance(_error_for(404, b"{}"), ModelNotFound)
    assert isinstance(_error_for(429, b"slow down"), RateLimited)
    assert "upstream:" in _error_for(500, b"").message
