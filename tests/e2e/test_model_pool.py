"""Several models in one real `llmhost serve`, loaded on demand: eviction under a budget that
fits two of three, a busy model never evicted, keep_alive, a failed load reported to every
waiter while the others keep serving, `llmhost models ps|load|unload`, and the 4xx of bad
model names and keep_alive values."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from llmhost.config import Settings
from llmhost.ops.serve_models import memory_need
from llmhost.security.auth import KeyStore
from tests.conftest import require
from tests.e2e.conftest import Server

openai = require("openai")

ARGS = ("--parallel", "2", "--ctx-size", "8192")


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("pool")
    files = {}
    for name in ("alpha", "beta", "gamma"):
        files[name] = home / f"{name}.gguf"
        shutil.copy(tiny_model.gguf, files[name])
    broken = home / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))  # a header and then garbage
    need, _ = memory_need(Settings(model=str(files["alpha"]), parallel=2, ctx_size=8192), {})
    budget_mb = math.ceil(2.5 * need / (1 << 20))
    assert 2 * need <= budget_mb << 20 < 3 * need
    keys = KeyStore(home / "keys.db")
    admin, _ = keys.create("ops", role="admin")
    user, _ = keys.create("dev")
    keys.close()
    srv = Server(
        home,
        *map(str, (files["alpha"], files["beta"], files["gamma"], broken)),
        *ARGS,
        "--memory-budget-mb",
        str(budget_mb),
        auth=True,
    )
    try:
        srv.wait_ready()
        srv.admin, srv.user = admin, user
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def chat(srv, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return httpx.post(
        srv.url + "/v1/chat/completions",
        json=body | extra,
        headers={"Authorization": f"Bearer {srv.user}"},
        timeout=120,
    )


def ps(srv) -> dict[str, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "llmhost", "models", "ps", "--json", "--url", srv.url],
        env={**os.environ, "LLMHOST_API_KEY": srv.admin},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {m["id"]: m for m in json.loads(done.stdout)["data"]}


def states(srv) -> dict[str, str]:
    return {k: m["state"] for k, m in ps(srv).items()}


def test_models_are_listed_and_loaded_on_demand(pool_server):
    srv = pool_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.user, max_retries=0)
    listed = {m.id: m for m in client.models.list().data}
    assert sorted(listed) == ["alpha", "beta", "broken", "gamma"]
    assert listed["alpha"].model_extra["kind"] == "chat"
    r = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.model == "beta" and r.choices[0].message.content is not None
    assert client.models.retrieve("beta").model_extra["state"] == "loaded"


def test_budget_of_two_evicts_the_least_recently_used(pool_server):
    srv = pool_server
    for name in ("alpha", "beta"):
        assert chat(srv, name).status_code == 200
    assert chat(srv, "alpha").status_code == 200  # beta is now the least recently used
    assert chat(srv, "gamma").status_code == 200
    now = states(srv)
    assert (now["alpha"], now["beta"], now["gamma"]) == ("loaded", "unloaded", "loaded")
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    for model, loaded in (("alpha", 1), ("beta", 0), ("gamma", 1)):
        assert f'llmhost_model_loaded{{model="{model}"}} {loaded}.0' in metrics
    assert 'llmhost_model_memory_bytes{model="beta"} 0.0' in metrics


def test_a_busy_model_is_never_evicted(pool_server):
    srv = pool_server
    assert chat(srv, "alpha").status_code == 200
    assert chat(srv, "gamma").status_code == 200  # alpha and gamma loaded, alpha older

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            headers = {"Authorization": f"Bearer {srv.user}"}
            body = {
                "model": "alpha",
                "messages": [{"role": "user", "content": "go on"}],
                "max_tokens": 300,
                "ignore_eos": True,
                "stream": True,
            }
            async with c.stream(
                "POST", srv.url + "/v1/chat/completions", json=body, headers=headers
            ) as long:
                assert long.status_code == 200
                lines = long.aiter_lines()
                await anext(lines)  # alpha is streaming
                r = await asyncio.to_thread(chat, srv, "beta")
                assert r.status_code == 200
                return states(srv)

    now = asyncio.run(main())
    assert (now["alpha"], now["beta"], now["gamma"]) == ("loaded", "loaded", "unloaded")


def test_a_failed_load_answers_every_waiter_and_others_keep_serving(pool_server):
    srv = pool_server

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            headers = {"Authorization": f"Bearer {srv.user}"}
            body = {"model": "broken", "messages": [{"role": "user", "content": "x"}]}
            return await asyncio.gather(
                *(
                    c.post(srv.url + "/v1/chat/completions", json=body, headers=headers)
                    for _ in range(3)
                )
            )

    for r in asyncio.run(main()):
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "model_load_error" and "broken" in err["message"]
    assert ps(srv)["broken"]["error"]
    assert chat(srv, "alpha").status_code == 200


def test_keep_alive_unloads_an_idle_model(pool_server):
    srv = pool_server
    assert chat(srv, "gamma", keep_alive="1s").status_code == 200
    deadline = time.monotonic() + 10
    while states(srv)["gamma"] != "unloaded":
        assert time.monotonic() < deadline, ps(srv)["gamma"]
        time.sleep(0.3)


def test_admin_load_and_unload_from_the_cli(pool_server):
    srv = pool_server
    env = {**os.environ, "LLMHOST_API_KEY": srv.admin}
    for verb, state in (("load", "loaded"), ("unload", "unloaded")):
        done = subprocess.run(
            [sys.executable, "-m", "llmhost", "models", verb, "beta", "--url", srv.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and done.stdout.strip() == f"beta: {state}", done.stderr
    user = subprocess.run(
        [sys.executable, "-m", "llmhost", "models", "ps", "--url", srv.url],
        env={**os.environ, "LLMHOST_API_KEY": srv.user},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert user.returncode == 1 and "403" in user.stderr


@pytest.mark.parametrize(
    "model, extra, status, param",
    [
        ("nope", {}, 404, "model"),
        ("alpha", {"keep_alive": -1}, 400, "keep_alive"),
        ("alpha", {"keep_alive": "10y"}, 400, "keep_alive"),
        ("alpha", {"keep_alive": 10**9}, 400, "keep_alive"),
    ],
)
def test_bad_model_and_keep_alive(pool_server, model, extra, status, param):
    r = chat(pool_server, model, **extra)
    assert r.status_code == status and r.json()["error"]["param"] == param
    if status == 404:
        assert "alpha, beta, broken, gamma" in r.json()["error"]["message"]


def test_a_key_restricted_to_one_model(pool_server):
    srv = pool_server
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "keys",
            "create",
            *("--user", "intern", "--models", "alpha"),
        ],
        env={**os.environ, "LLMHOST_HOME": str(srv.log.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=made.stdout.strip(), max_retries=0)
    assert [m.id for m in client.models.list().data] == ["alpha"]
    with pytest.raises(openai.PermissionDeniedError, match="'beta'"):
        client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    ok = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.model == "alpha"
