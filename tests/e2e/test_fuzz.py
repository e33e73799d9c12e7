"""The whole API fuzzed: schemathesis with its default checks against a real `llmhost serve`
(fake engine, auth and audit on), and hypothesis over the request models with any Unicode
(lone surrogates and control characters included) through the app. Together over 2,000 cases;
each must get no 5xx, leave exactly one audit record per audited request, and leave the
server healthy."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmhost.api import create_app
from llmhost.audit.store import open_store
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore
from tests.conftest import IN_CI
from tests.e2e.conftest import free_port, wait_until_ready

AUDITED = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/rerank",
    "/generate",
)
# A schema-valid request can still ask for more tokens than the model's context holds: that
# is a 400 (context_length_exceeded), as OpenAI answers it, so positive data may get a 400.
SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "400", "401", "403", "404", "409", "429", "5XX"]
"""


def _audited_requests(metrics: str) -> int:
    total = 0
    for line in metrics.splitlines():
        m = re.match(r"llmhost_requests_total\{([^}]*)\} ([0-9.e+]+)$", line)
        if m and any(f'route="{r}"' in m.group(1) for r in AUDITED):
            total += int(float(m.group(2)))
    return total


def _audit_records(home: Path) -> int:
    """Records of requests, less those of keys made through the admin key endpoints (the
    fuzzing admin makes some), which are no requests the metrics count."""
    store = open_store(None, home / "audit.db")
    try:
        return sum(1 for r in store.search() if not r.route.startswith("/v1/admin/keys"))
    finally:
        store.close()


def test_schemathesis_default_checks_find_nothing(tmp_path):
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        if IN_CI:
            pytest.fail("schemathesis is required in CI but missing")
        pytest.skip("schemathesis not installed")
    env = {
        **os.environ,
        "LLMHOST_HOME": str(tmp_path),
        "LLMHOST_RATE_LIMIT_RPS": "0",
        # schemathesis sends requests without credentials on purpose; they must get a 401
        "LLMHOST_AUTH_FAILURES_PER_MINUTE": "0",
    }
    keys = KeyStore(tmp_path / "keys.db")
    key, _ = keys.create("fuzz", role="admin")
    keys.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "llmhost", "serve", "--engine", "fake", "--port", str(port)),
            *("--ctx-size", "100000", "--log-level", "warning"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_ready(url, timeout=60)
        (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
        p = subprocess.run(
            [
                *(str(exe), "run", url + "/openapi.json", "-H", f"Authorization: Bearer {key}"),
                *("--max-examples", "350", "--seed", "7"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,  # the config above, and schemathesis's cache of crashes
        )
        assert p.returncode == 0, p.stdout[-6000:]
        m = re.search(r"(\d+) generated, (\d+) passed", p.stdout)
        assert m and m.group(1) == m.group(2), p.stdout[-3000:]
        assert int(m.group(1)) >= 1500, p.stdout[-1000:]
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert httpx.get(url + "/ready", timeout=5).status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert re.search(r'llmhost_requests_total\{[^}]*status="5\d\d"', metrics) is None
        sent = _audited_requests(metrics)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert sent > 500
    assert _audit_records(tmp_path) == sent  # not one record lost
    assert "audit record" not in (tmp_path / "server.log").read_text()


# Any code point, lone surrogates and C0/C1 controls included.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)
JSON_SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | ANY_TEXT
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | ANY_TEXT},
    optional={"content": ANY_TEXT | JSON, "name": ANY_TEXT},
)
SAMPLING = {
    "temperature": JSON_SCALAR,
    "top_p": JSON_SCALAR,
    "seed": JSON_SCALAR,
    "stop": ANY_TEXT | st.lists(ANY_TEXT, max_size=20) | JSON,
    "stream": st.booleans() | JSON_SCALAR,
    "max_tokens": st.integers(-2, 8) | JSON_SCALAR,
    "ignore_eos": st.booleans(),
    "user": ANY_TEXT,
    "n": JSON_SCALAR,
    "logprobs": JSON_SCALAR,
    "stream_options": JSON,
}
ITEM = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "function_call", "function_call_output"]) | ANY_TEXT,
        "role": st.sampled_from(["user", "assistant", "developer", "tool"]) | ANY_TEXT,
        "content": ANY_TEXT | JSON,
        "call_id": ANY_TEXT,
        "name": ANY_TEXT,
        "arguments": ANY_TEXT,
        "output": ANY_TEXT | JSON,
    },
)
RESPONSES = {
    "instructions": ANY_TEXT | JSON_SCALAR,
    "temperature": JSON_SCALAR,
    "top_p": JSON_SCALAR,
    "seed": JSON_SCALAR,
    "stream": st.booleans() | JSON_SCALAR,
    "max_output_tokens": st.integers(-2, 8) | JSON_SCALAR,
    "tools": JSON,
    "tool_choice": JSON,
    "text": JSON,
    "previous_response_id": JSON_SCALAR,
}
BODIES = st.one_of(
    st.tuples(
        st.just("/v1/completions"),
        st.fixed_dictionaries(
            {"prompt": ANY_TEXT | st.lists(st.integers(-5, 70000), max_size=8) | JSON},
            optional=SAMPLING,
        ),
    ),
    st.tuples(
        st.just("/v1/chat/completions"),
        st.fixed_dictionaries(
            {"messages": st.lists(MESSAGE, max_size=4) | JSON}, optional=SAMPLING
        ),
    ),
    st.tuples(
        st.just("/v1/responses"),
        st.fixed_dictionaries(
            {"input": ANY_TEXT | st.lists(ITEM, max_size=4) | JSON}, optional=RESPONSES
        ),
    ),
    st.tuples(
        st.just("/generate"),
        st.fixed_dictionaries(
            {"prompt": ANY_TEXT | JSON},
            optional={"max_new_tokens": JSON_SCALAR, "max_length": JSON_SCALAR},
        ),
    ),
    st.tuples(st.sampled_from(AUDITED), JSON),
)


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz")
    secret = "s" * 40
    conf = Settings(home=home, rate_limit_rps=0, auth_failures_per_minute=0, jwt_secret=secret)
    # a user id no database takes as it is: a lone surrogate and a terminal escape
    claims = {"sub": "fuzz\ud800\x1b[31m", "exp": int(time.time()) + 3600}
    token = jwt.encode(claims, secret, algorithm="HS256")
    return home, conf, token


async def test_hypothesis_any_unicode_through_the_request_models(fuzzed_app):
    home, conf, key = fuzzed_app
    app = create_app(FakeEngine(context_length=4096), conf)
    sent = 0
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

            @settings(
                max_examples=1000,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(BODIES)
            def case(route_body):
                cases.append(route_body)

            cases: list = []
            case()
            for route, body in cases:
                # ensure_ascii carries lone surrogates as \ud800 escapes, as JSON allows
                raw = json.dumps(body, ensure_ascii=True, allow_nan=True)
                r = await c.post(route, content=raw, headers=headers)
                sent += 1
                assert r.status_code < 500, (route, raw[:500], r.text[:500])
                if r.status_code >= 400:
                    assert r.json()["error"]["message"]
            assert (await c.get("/health")).status_code == 200
    assert sent >= 1000
    assert _audit_records(home) == sent
    store = open_store(None, home / "audit.db")
    try:
        users = {r.user_id for r in store.search(limit=5)}
    finally:
        store.close()
    assert users == {"fuzz\\ud800\x1b[31m"}  # kept, escaped, never dropped
