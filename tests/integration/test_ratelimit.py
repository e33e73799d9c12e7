"""Rate limits through the app: headers and Retry-After, per-user requests and tokens per
minute, and the per-instance limit's precision under 3 x overload."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore, Principal
from llmhost.security.ratelimit import RateLimiter
from tests.conftest import IN_CI, require


async def _app(settings: Settings):
    app = create_app(FakeEngine(script=["a", " b"]), settings)
    return app


async def test_per_user_requests_per_minute_with_headers(tmp_path):
    settings = Settings(home=tmp_path, audit=False, rate_limit_rps=0, rate_limit_rpm=1000)
    keys = KeyStore(settings.keys_db)
    k3, _ = keys.create("three", rpm=3)
    kd, _ = keys.create("default")
    keys.close()
    app = await _app(settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
            seen = []
            for _ in range(4):
                r = await c.get("/v1/models", headers={"Authorization": f"Bearer {k3}"})
                seen.append((r.status_code, r.headers.get("x-ratelimit-remaining")))
            assert seen[:3] == [(200, "2"), (200, "1"), (200, "0")]
            assert seen[3][0] == 429
            body = r.json()["error"]
            assert body["type"] == "rate_limit_error" and "3 requests/min" in body["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert r.headers["x-ratelimit-limit"] == "3"
            # another user is not affected, and gets the server default
            r = await c.get("/v1/models", headers={"Authorization": f"Bearer {kd}"})
            assert r.status_code == 200 and r.headers["x-ratelimit-limit"] == "1000"
            # public endpoints are never limited
            assert (await c.get("/health")).status_code == 200


async def test_tokens_per_minute_counts_actual_usage(tmp_path):
    settings = Settings(home=tmp_path, audit=False, rate_limit_rps=0)
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create("tok", tpm=20)
    keys.close()
    app = await _app(settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        t = httpx.ASGITransport(app=app)
        h = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=t, base_url="http://t", headers=h) as c:
            body = {"prompt": "one two three", "max_tokens": 4}  # 3 + 4 = 7 tokens each
            codes = [(await c.post("/v1/completions", json=body)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]  # 21 tokens used of 20: the fourth is refused


async def test_instance_limit_is_exact_under_overload(tmp_path):
    """Offered 3x the instance limit for 3 s: no 1-second window ever admits more than the
    limit, and the limiter does not refuse what it could take. Admissions are stamped when the
    limiter grants them, on its own clock (time.time), so a slow event loop delaying responses
    cannot move a stamp from one window into the next. What it could take is measured, not
    assumed: an exact moving window replayed on the times the requests reached the limiter (a
    busy machine delivers fewer arrivals late in a window, and then fewer can be admitted)."""
    settings = Settings(home=tmp_path, audit=False, auth=False, rate_limit_rps=100)
    app = await _app(settings)
    granted: list[float] = []
    asked: list[float] = []
    codes: dict[int, int] = {}
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        limiter = app.state.limiter
        hit = limiter.local.hit

        async def stamped_hit(item, *identifiers, cost=1):
            if identifiers == ("instance",):
                asked.append(time.time())
            ok = await hit(item, *identifiers, cost=cost)
            if ok and identifiers == ("instance",):
                granted.append(time.time())
            return ok

        limiter.local.hit = stamped_hit
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as c:

            async def one() -> None:
                r = await c.get("/v1/models")
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

            start = time.monotonic()
            rate, seconds = 300, 3
            tasks = []
            for i in range(rate * seconds):  # open loop: arrivals do not wait for answers
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
    assert set(codes) <= {200, 429}, codes  # nothing but admitted or refused, no 5xx
    assert codes[200] == len(granted)
    assert codes[429] == rate * seconds - len(granted)
    granted.sort()
    # the moving window's promise: any 1-second span holds at most 100 admissions
    j = 0
    for i, g in enumerate(granted):
        while granted[j] <= g - 1.0:
            j += 1
        assert i - j + 1 <= 100, (i - j + 1, g - granted[0])
    # and it takes what it may: as many as an exact moving window admits from the same arrivals
    # (a request at a window's very edge may fall either side, hence the small tolerance)
    assert len(asked) == rate * seconds
    ideal = _moving_window_admits(asked, limit=100, span=1.0)
    assert ideal >= 100, ideal  # the first window at least fills (900 arrive)
    assert len(granted) >= ideal - 3, (len(granted), ideal, asked[-1] - asked[0])


def _moving_window_admits(arrivals: list[float], limit: int, span: float) -> int:
    """How many of these arrivals an exact moving window of `limit` per `span` admits."""
    admitted: list[float] = []
    j = 0
    for t in sorted(arrivals):
        while j < len(admitted) and admitted[j] <= t - span:
            j += 1
        if len(admitted) - j < limit:
            admitted.append(t)
    return len(admitted)


@pytest.fixture()
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI but missing")
        pytest.skip("redis-server not installed")
    require("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_instances_share_limits_through_redis(tmp_path, redis_url):
    settings = Settings(home=tmp_path, audit=False, rate_limit_rps=0, redis_url=redis_url)
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create("shared", rpm=3)
    keys.close()
    a, b = await _app(settings), await _app(settings)
    h = {"Authorization": f"Bearer {key}"}
    async with a.router.lifespan_context(a), b.router.lifespan_context(b):
        while not (a.state.ready and b.state.ready):
            await asyncio.sleep(0.01)
        ca = httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://a", headers=h)
        cb = httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://b", headers=h)
        async with ca, cb:
            codes = [
                (await ca.get("/v1/models")).status_code,
                (await cb.get("/v1/models")).status_code,
                (await ca.get("/v1/models")).status_code,
                (await cb.get("/v1/models")).status_code,
            ]
    assert codes == [200, 200, 200, 429]


async def test_through_redis_the_instance_limit_stays_each_instances_own(redis_url):
    """Two instances on one Redis, 5 requests/s each, one user at 8/min: the user's budget is
    shared (8 in all) while each instance keeps its own capacity (A's 5 do not fill B)."""
    ns = f"t{time.monotonic_ns()}"
    a, b = (
        RateLimiter(instance_rps=5, redis_url=redis_url, namespace=ns),
        RateLimiter(instance_rps=5, redis_url=redis_url, namespace=ns),
    )
    user = Principal("carol", rpm=8)
    first = [await a.admit(user) for _ in range(6)]
    assert [d.allowed for d in first] == [True] * 5 + [False]
    assert first[-1].scope == "instance"
    assert [d.remaining for d in first[:5]] == [4, 3, 2, 1, 0]  # the tighter: the instance's
    second = [await b.admit(user) for _ in range(4)]
    assert [d.allowed for d in second] == [True] * 3 + [False]
    assert second[-1].scope == "user_requests" and second[-1].headers()["Retry-After"]
    assert [d.remaining for d in second[:3]] == [2, 1, 0]  # the user's: 8 less 5 less each


async def test_remaining_counts_concurrent_requests_of_the_user(redis_url):
    """Five requests of one user at once through Redis, 10 a minute: each one's
    X-RateLimit-Remaining counts what this instance counted after its reading, so the five
    read 9, 8, 7, 6 and 5 (what is left), not 9 each."""
    limiter = RateLimiter(instance_rps=0, redis_url=redis_url, namespace=f"r{time.time_ns()}")
    user = Principal("dana", rpm=10)
    got = await asyncio.gather(*(limiter.admit(user) for _ in range(5)))
    assert all(d.allowed for d in got)
    assert sorted(int(d.headers()["X-RateLimit-Remaining"]) for d in got) == [5, 6, 7, 8, 9]
    assert limiter._counted._users == {}  # nothing kept once no request is between
    assert (await limiter.admit(user)).remaining == 4
