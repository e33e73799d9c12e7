"""Inputs that once broke the server or its audit log, through the whole app (fake engine):
lone surrogates, token-id prompts, bodies and URLs over the limits, prompts that made
redaction quadratic, token limits dodged by dropping streams, floods of bad credentials, and
an audit store that refuses one record of a batch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from llmhost.api import create_app
from llmhost.api.audit import PendingRecord, PromptPolicy, stored_prompt
from llmhost.audit.store import AuditRecord, SqliteAuditStore
from llmhost.audit.writer import AuditWriter, storable
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore
from llmhost.security.redact import Redactor

JSON = {"content-type": "application/json"}


def _settings(tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path, rate_limit_rps=0, **kw)


def _key(settings: Settings, user: str = "alice", **kw) -> str:
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create(user, **kw)
    keys.close()
    return key


class LoopLag:
    """The longest the event loop was held up while it ran (a 5 ms ticker's overshoot)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - t - 0.005)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()


@contextlib.asynccontextmanager
async def running(app, client=("10.0.0.1", 1234), headers=None):
    """The app started (lifespan) and a client on the in-memory transport."""
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        async with _client(app, client, headers) as c:
            yield c


def _client(app, client=("10.0.0.1", 1234), headers=None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(
        transport=transport, base_url="http://t", headers=headers or {}, timeout=30
    )


def _records(tmp_path) -> list:
    store = SqliteAuditStore(tmp_path / "audit.db")
    try:
        return store.search()
    finally:
        store.close()


async def test_lone_surrogates_are_refused_and_recorded_escaped(tmp_path):
    settings = _settings(tmp_path)
    key = _key(settings)
    app = create_app(FakeEngine(), settings)
    async with running(app, headers={"Authorization": f"Bearer {key}"}) as c:
        raw = '{"prompt": "x\\ud800", "max_tokens": 2}'
        r = await c.post("/v1/completions", content=raw, headers=JSON)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt"
        assert "surrogate" in r.json()["error"]["message"]
        raw = '{"messages": [{"role": "user", "content": "\\udfff hi"}]}'
        r = await c.post("/v1/chat/completions", content=raw, headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        raw = '{"prompt": "hi", "stop": ["\\ud83d"]}'
        r = await c.post("/v1/completions", content=raw, headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        for i in range(40):
            r = await c.post("/v1/completions", json={"prompt": f"ok {i}", "max_tokens": 1})
            assert r.status_code == 200
    found = _records(tmp_path)
    assert len(found) == 43
    assert found[0].prompt == "x\\ud800" and found[0].status == 400
    assert [r.prompt for r in found[3:]] == [f"ok {i}" for i in range(40)]


async def test_token_id_prompts_are_served_and_recorded_as_ids(tmp_path):
    settings = _settings(tmp_path, audit_prompt_mode="redacted")
    key = _key(settings)
    app = create_app(FakeEngine(), settings)
    async with running(app, headers={"Authorization": f"Bearer {key}"}) as c:
        r = await c.post("/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 2})
        assert r.status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "after", "max_tokens": 1})
        assert r.status_code == 200
    found = _records(tmp_path)
    assert [r.prompt for r in found] == ["token_ids:[1,2,3,4]", "after"]


def test_stored_prompt_shapes_and_caps():
    r = Redactor()
    assert stored_prompt([5, 6], "full", r) == "token_ids:[5,6]"
    assert stored_prompt([5, 6], "hash", r).startswith("sha256:")
    capped = stored_prompt("mail a@b.io " + "x" * 1000, "redacted", r, max_chars=300)
    assert capped.startswith("mail [EMAIL] x")
    assert capped.endswith("…[truncated: 712 more characters]")
    # a secret that straddles the cap is redacted whole, never cut in half and kept
    secret = "sk-" + "A" * 40
    out = stored_prompt("y" * 290 + " " + secret + " tail", "redacted", r, max_chars=300)
    assert "AAAA" not in out and "[API_KEY]" in out
    assert stored_prompt("x" * 50, "full", r, max_chars=10) == "x" * 10 + (
        "…[truncated: 40 more characters]"
    )
    # escaping for storage: lone surrogates and NUL, nothing else changes
    assert storable("a\ud800b\x00") == "a\\ud800b\\x00"
    assert storable("plain 中文 \\ud800") == "plain 中文 \\ud800"


async def test_oversized_bodies_and_urls_are_refused_before_reading(tmp_path):
    settings = _settings(tmp_path, max_request_bytes=64 * 1024)
    key = _key(settings)
    app = create_app(FakeEngine(), settings)
    async with running(app, headers={"Authorization": f"Bearer {key}"}) as c:
        big = json.dumps({"prompt": "x" * 100_000}).encode()
        r = await c.post("/v1/completions", content=big)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert "65536" in r.json()["error"]["message"]

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b"x" * 1024

        r = await c.post("/v1/completions", content=chunks())
        assert r.status_code == 413
        r = await c.get("/v1/models?q=" + "a" * 20000)
        assert r.status_code == 414
        r = await c.get("/v1/models?q=" + "a" * 20000, headers={"Authorization": ""})
        assert r.status_code == 414
        ok = await c.post("/v1/completions", json={"prompt": "x" * 60_000, "max_tokens": 1})
        assert ok.status_code == 200
    statuses = [r.status for r in _records(tmp_path)]
    assert statuses == [413, 413, 200]
    stored = _records(tmp_path)[2].prompt
    assert stored.endswith("…[truncated: 27232 more characters]")


async def test_hostile_prompts_never_hold_up_the_event_loop(tmp_path):
    """Prompts built against naive redaction patterns (each once took seconds on the event
    loop) leave the loop responsive: redaction is linear and runs in the audit thread."""
    settings = _settings(tmp_path)
    key = _key(settings)
    app = create_app(FakeEngine(context_length=1 << 20), settings)
    hostile = ["a-" * 75_000, "a." * 75_000, "eyJ-" * 37_500, "1 " * 75_000, "a@a." * 37_500]
    async with running(app, headers={"Authorization": f"Bearer {key}"}) as c:
        with LoopLag() as lag:
            for text in hostile:
                r = await c.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
                assert r.status_code == 200
                r = await c.get("/v1/models", params={"q": text[:2000]})
                assert r.status_code == 200
            await app.state.audit.close()  # every record prepared and written
            app.state.audit.start()
        # without the fixes one such prompt held the loop for over a second
        assert lag.worst < 0.25, lag.worst
    assert len(_records(tmp_path)) == len(hostile)


def test_redaction_is_linear_on_adversarial_text():
    r = Redactor(ip=True)
    units = ["a-", "a.", "1-", "1 ", "eyJ-", "a@", "a@a.", "+1 ", "Bearer ", "1.1.1.", "a:"]
    units += ['password="', "(415) 555-", "4111 ", "sk-", "x"]
    for unit in units:
        times = []
        for n in (40_000, 160_000):
            text = (unit * (n // len(unit) + 1))[:n]
            t0 = time.perf_counter()
            r.run(text)
            times.append(time.perf_counter() - t0)
        # 4 x the text may take at most ~8 x the time (noise), never 16 x (quadratic)
        assert times[1] < 8 * times[0] + 0.05, (unit, times)
        assert times[1] < 2.0, (unit, times)


class LiveServer:
    """The app behind a real uvicorn on a loopback port, in this event loop (the in-memory
    transport buffers whole responses, so a client cannot leave a stream midway through it)."""

    def __init__(self, app) -> None:
        import uvicorn

        from tests.e2e.conftest import free_port

        self.port = free_port()
        config = uvicorn.Config(app, port=self.port, log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LiveServer:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await self.task


async def test_dropped_streams_are_charged_what_they_received(tmp_path):
    settings = _settings(tmp_path)
    key = _key(settings, tpm=100)
    engine = FakeEngine(script=["w"], token_delay=0.005, context_length=4096)
    app = create_app(engine, settings)
    async with LiveServer(app) as srv:
        while not app.state.ready:
            await asyncio.sleep(0.01)
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=srv.url, headers=auth, timeout=30) as c:
            body = {"prompt": "go", "max_tokens": 500, "stream": True, "ignore_eos": True}
            received = 0
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        received += 1
                    if received == 60:
                        break  # the client goes away mid-stream
            while engine.active:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            short = {**body, "max_tokens": 5}
            r = await c.post("/v1/completions", json=short)
            assert r.status_code == 200, r.text  # ~61 + 6 tokens < 100: still admitted
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200  # admitted, then charged its 500 tokens in full
            r = await c.post("/v1/completions", json=short)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
    first = _records(tmp_path)[0]
    assert first.status == 499
    assert 60 <= first.completion_tokens <= 75, first.completion_tokens


async def test_failed_authentication_is_limited_per_client_ip(tmp_path):
    settings = _settings(tmp_path, auth_failures_per_minute=10)
    key = _key(settings)
    app = create_app(FakeEngine(), settings)
    async with running(app, client=("10.9.9.9", 1)) as bad:
        codes = []
        for i in range(25):
            r = await bad.get("/v1/models", headers={"Authorization": f"Bearer nope{i}"})
            codes.append(r.status_code)
        assert codes == [401] * 10 + [429] * 15
        assert r.json()["error"]["code"] == "auth_failures"
        assert int(r.headers["retry-after"]) >= 1
        # a refused client is refused before its credentials are looked at, good or bad
        r = await bad.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 429
        async with _client(app, client=("10.9.9.10", 1)) as good:
            r = await good.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
            metrics = (await good.get("/metrics")).text
            assert 'llmhost_rate_limit_rejections_total{limit="auth_failures"} 16.0' in metrics


class RefusingStore(SqliteAuditStore):
    """Refuses any batch holding a record of user `poison`, as a database refuses a value."""

    def append(self, records):
        if any(r.user_id == "poison" for r in records):
            raise ValueError("refused")
        return super().append(records)


def _rec(i: int, user: str = "u") -> AuditRecord:
    return AuditRecord(1_700_000_000 + i, f"r{i}", "127.0.0.1", user, "/v1/completions", 200)


async def test_one_refused_record_never_takes_others_with_it(tmp_path):
    store = RefusingStore(tmp_path / "audit.db")
    dropped = []
    w = AuditWriter(store, retry_delay=0.001, on_drop=dropped.append)
    w.start()
    for i in range(100):
        w.submit(_rec(i, "poison" if i in (7, 50) else "u"))
    await w.close()
    ids = [r.request_id for r in store.search()]
    assert ids == [f"r{i}" for i in range(100) if i not in (7, 50)]
    assert w.dropped == 2 and sum(dropped) == 2
    assert store.verify().ok
    store.close()


async def test_a_record_that_cannot_be_prepared_is_kept_without_its_prompt(tmp_path):
    store = SqliteAuditStore(tmp_path / "audit.db")

    class Boom(Redactor):
        def run(self, text, limit=None):
            raise RuntimeError("redactor broke")

    w = AuditWriter(store, prepare=PromptPolicy(redactor=Boom()).prepare)
    w.start()
    w.submit(PendingRecord(_rec(1), "secret a@b.io"))
    w.submit(PendingRecord(_rec(2), None))
    await w.close()
    found = store.search()
    assert [r.prompt for r in found] == ["[prompt not recorded: RuntimeError]", None]
    store.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("call (415) 555-2671 today", "call [PHONE] today"),
        ("call 415-555-2671", "call [PHONE]"),
        ("call 415.555.2671.", "call [PHONE]."),
        ("call 1-415-555-2671", "call [PHONE]"),
        ("order 4155552671 shipped", "order 4155552671 shipped"),
        ("version 415.555.2671.3", "version 415.555.2671.3"),
        ("code 015-555-2671", "code 015-555-2671"),
    ],
)
def test_north_american_phone_numbers(text, expected):
    assert Redactor().redact(text) == expected


async def test_a_failure_making_the_record_is_counted_and_the_client_unharmed(tmp_path):
    settings = _settings(tmp_path)
    key = _key(settings)
    app = create_app(FakeEngine(), settings)
    async with running(app, headers={"Authorization": f"Bearer {key}"}) as c:
        await c.get("/health")  # the middleware stack is built on the first request
        stack = app.middleware_stack
        while type(stack).__name__ != "AuditMiddleware":
            stack = stack.app
        original = stack._record

        def broken(*args):
            raise RuntimeError("boom")

        stack._record = broken
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200  # the client never sees the audit trail fail
        stack._record = original
        r = await c.post("/v1/completions", json={"prompt": "again", "max_tokens": 1})
        assert r.status_code == 200
        assert app.state.audit.dropped == 1
        metrics = (await c.get("/metrics")).text
        assert "llmhost_audit_records_dropped_total 1.0" in metrics
    assert [r.prompt for r in _records(tmp_path)] == ["again"]
