"""The router in front of real `llmhost serve` replicas: load spreads, streams pass through,
a replica killed with -9 is taken out within seconds while requests keep succeeding (retried
before their first byte), it comes back when restarted, and weights move traffic."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import Server, free_port

TOKEN = "router-admin-token-for-tests"


class Router:
    def __init__(self, tmp: Path, *upstreams: str, check_every: float = 0.5):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "llmhost",
            "router",
            "--port",
            str(self.port),
            "--check-every",
            str(check_every),
            "--log-level",
            "warning",
        ]
        for u in upstreams:
            cmd += ["-u", u]
        self.log = tmp / f"router-{self.port}.log"
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, "LLMHOST_ROUTER_TOKEN": TOKEN},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(self.log.read_text()[-2000:])

    def status(self) -> dict:
        r = httpx.get(
            self.url + "/router/status", timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        return {u["name"]: u for u in r["upstreams"]}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def wait_for(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture
def fakes(tmp_path):
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        srv = Server(tmp_path / name, "--engine", "fake")
        srv.wait_ready()
        servers.append(srv)
    yield servers
    for srv in servers:
        if srv.proc.poll() is None:
            srv.stop()


def test_spread_stream_failover_and_weights(fakes, tmp_path):
    a, b = fakes
    router = Router(tmp_path, f"a={a.url}", f"b={b.url}")
    try:
        with httpx.Client(base_url=router.url, timeout=30) as c:
            seen = {
                c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).headers[
                    "x-llmhost-upstream"
                ]
                for _ in range(10)
            }
            assert seen == {"a", "b"}
            with c.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                    "max_tokens": 3,
                },
            ) as r:
                text = "".join(r.iter_text())
            assert r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
            assert c.get("/v1/models").json()["data"][0]["id"]
            bad = c.post("/v1/completions", content=b"{not json")
            assert bad.status_code == 400 and "error" in bad.json()  # upstream errors pass through

            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            codes = [
                c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
                for _ in range(20)
            ]
            assert codes == [200] * 20  # retried on b before any byte reached the client
            took = wait_for(lambda: not router.status()["a"]["healthy"], 5, "a marked out")
            assert took < 5

            # back on the same port: in again within seconds
            env = {**os.environ, "LLMHOST_HOME": str(tmp_path / "a")}
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmhost",
                    "serve",
                    "--engine",
                    "fake",
                    "--no-auth",
                    "--port",
                    str(a.port),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_for(lambda: router.status()["a"]["healthy"], 30, "a back in")
                # weights: everything to a, then none to a
                denied = c.put("/router/weights", json={"b": 0})
                assert denied.status_code == 401
                h = {"Authorization": f"Bearer {TOKEN}"}
                for body, code in (
                    ({"b": 0}, 200),
                    ({"nope": 1}, 404),
                    ({"a": -1}, 400),
                    ({"a": "x"}, 400),
                    ([], 400),
                ):
                    assert c.put("/router/weights", json=body, headers=h).status_code == code
                seen = {
                    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).headers[
                        "x-llmhost-upstream"
                    ]
                    for _ in range(6)
                }
                assert seen == {"a"}
                assert c.put("/router/weights", json={"a": 0}, headers=h).status_code == 200
                r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
                assert r.status_code == 503 and "no upstream" in r.json()["error"]["message"]
                assert c.get("/ready").status_code == 503
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    finally:
        router.stop()


DRILL_SECONDS = float(os.environ.get("LLMHOST_DRILL_SECONDS", "150"))


async def steady_load(url: str, rate: float, seconds: float) -> dict:
    """`rate` req/s for `seconds`, alternating streaming and non-streaming completions."""
    results: list[bool] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def one(i: int) -> None:
            body = {"prompt": f"request {i}", "max_tokens": 12, "ignore_eos": True}
            try:
                if i % 2:
                    async with c.stream(
                        "POST", "/v1/completions", json={**body, "stream": True}
                    ) as r:
                        text = "".join([t async for t in r.aiter_text()])
                    ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
                else:
                    r = await c.post("/v1/completions", json=body)
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
            except httpx.HTTPError:
                ok = False
            results.append(ok)

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return {"total": len(results), "ok": sum(results)}


@pytest.mark.slow
def test_availability_drill_kill_9_under_load(tiny_model, tmp_path):
    """Two supervised replicas of the tiny model behind the router at 20 req/s; one replica's
    server is killed with -9 mid-run: >= 99.95% of requests succeed, it is out within
    seconds and back in after its supervisor restarts it."""
    reps = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        srv = Server(
            tmp_path / name,
            str(tiny_model.gguf),
            "--parallel",
            "4",
            "--threads",
            "1",
            "--restart-on-crash",
        )
        srv.wait_ready()
        reps.append(srv)
    router = Router(tmp_path, f"a={reps[0].url}", f"b={reps[1].url}")
    try:

        async def kill_later() -> dict:
            await asyncio.sleep(DRILL_SECONDS / 3)
            child = psutil.Process(reps[0].proc.pid).children()[0]
            child.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            out = {"out_after": None, "back_after": None}
            while time.monotonic() - t0 < 60:
                st = await asyncio.to_thread(router.status)
                if out["out_after"] is None and not st["a"]["healthy"]:
                    out["out_after"] = time.monotonic() - t0
                if out["out_after"] is not None and st["a"]["healthy"]:
                    out["back_after"] = time.monotonic() - t0
                    break
                await asyncio.sleep(0.1)
            return out

        async def drill():
            return await asyncio.gather(kill_later(), steady_load(router.url, 20, DRILL_SECONDS))

        times, result = asyncio.run(drill())
        print(json.dumps({**result, **times}))
        assert result["ok"] / result["total"] >= 0.9995, result
        assert times["out_after"] is not None and times["out_after"] < 5, times
        assert times["back_after"] is not None and times["back_after"] < 60, times
    finally:
        router.stop()
        for srv in reps:
            srv.stop()
