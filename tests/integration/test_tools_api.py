"""Tools, tool_choice, response_format and whole messages through the HTTP API with the scripted
engine: calls parsed from the model's text (whole and streamed), every bad input a 400 that
names the field, and unknown fields refused rather than dropped."""

from __future__ import annotations

import json

import httpx
import pytest

from llmhost.api import create_app
from llmhost.engines.fake import FakeEngine
from llmhost.engines.openai_upstream import OpenAIUpstreamEngine
from tests.conftest import open_settings
from tests.integration.test_api import assert_error, sse_events

HERMES_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}"
    "\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS:{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL_SCRIPT = (
    "Let me look.",
    "<tool_call>",
    '\n{"name": "get_weather",',
    ' "arguments": {"city":',
    ' "Paris"}}\n',
    "</tool_call>",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
USER = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture
async def env():
    engine = FakeEngine(
        model_id="fake-model",
        script=CALL_SCRIPT,
        context_length=4096,
        eos_after=len(CALL_SCRIPT),
        chat_template=HERMES_TEMPLATE,
    )
    app = create_app(engine, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, engine


async def test_tool_call_parsed_from_the_text(env):
    c, engine = env
    r = await c.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] == "Let me look."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the tools reached the template
    assert '"name": "get_weather"' in engine.requests[-1].prompt


async def test_tool_call_streamed_as_openai_deltas(env):
    c, _ = env
    r = await c.post(
        "/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "stream": True}
    )
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert deltas[0]["role"] == "assistant"
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me look."
    assert "<tool_call>" not in json.dumps(deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in tc for tc in calls[1:])
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(args) == {"city": "Paris"}
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}


async def test_tool_choice_none_is_plain_text(env):
    c, engine = env
    r = await c.post(
        "/v1/chat/completions",
        json={"messages": USER, "tools": [WEATHER], "tool_choice": "none"},
    )
    msg = r.json()["choices"][0]["message"]
    assert "tool_calls" not in msg and "<tool_call>" in msg["content"]
    assert "TOOLS:" not in engine.requests[-1].prompt


async def test_tool_round_trip_reaches_the_template(env):
    c, engine = env
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = await c.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    prompt = engine.requests[-1].prompt
    assert "sunny, 21 C" in prompt and '"city": "Paris"' in prompt
    assert engine.requests[-1].messages[1]["tool_calls"][0]["id"] == "call_1"


async def test_forced_choice_and_schemas_need_an_engine_that_constrains(env):
    c, _ = env
    for body, param in [
        ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            "tool_choice",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ]:
        r = await c.post("/v1/chat/completions", json={"messages": USER, **body})
        err = assert_error(r, 400, "not supported by this model's engine")
        assert err["param"] == param


BIG_SCHEMA = {
    "type": "object",
    "properties": {f"f{i}": {"type": "string", "description": "x" * 200} for i in range(5000)},
}


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"tools": [{"type": "function", "function": {}}]}, "tools", "name"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "letters"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools",
            "object",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": 7},
                        },
                    }
                ]
            },
            "tools",
            "not a valid JSON schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": BIG_SCHEMA}}]},
            "tools",
            "bytes",
        ),
        ({"tools": [WEATHER] * 2}, "tools", "two tools"),
        (
            {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(10_000)]},
            "tools",
            "at most 128",
        ),
        ({"tools": []}, "tools", "empty"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
            "not a valid JSON schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", ""),
        ({"functions": [{"name": "f"}]}, "functions", "unknown field"),
        ({"frobnicate": 1}, "frobnicate", "unknown field"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ],
)
async def test_bad_tools_and_formats_are_400s_naming_the_field(env, body, param, fragment):
    c, engine = env
    before = len(engine.requests)
    r = await c.post("/v1/chat/completions", json={"messages": USER, **body})
    err = assert_error(r, 400, fragment)
    assert err["param"] == param
    assert len(engine.requests) == before  # refused before generation
    assert (await c.post("/v1/chat/completions", json={"messages": USER})).status_code == 200


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([*USER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}], "no earlier"),
        ([*USER, {"role": "tool", "content": "x"}], "tool_call_id"),
        ([{"role": "user", "content": "x", "tool_call_id": "a"}], "only tool messages"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "text only",
        ),
        ([{"role": "user", "content": "x", "colour": "red"}], "unknown field"),
    ],
)
async def test_bad_messages(env, messages, fragment):
    c, _ = env
    r = await c.post("/v1/chat/completions", json={"messages": messages})
    err = assert_error(r, 400, fragment)
    assert err["param"] == "messages"


async def test_documented_ignored_fields_are_accepted(env):
    c, _ = env
    r = await c.post(
        "/v1/chat/completions",
        json={
            "messages": [
                *USER,
                # what the openai SDK hands back for an assistant turn
                {
                    "role": "assistant",
                    "content": "hi",
                    "refusal": None,
                    "annotations": [],
                    "audio": None,
                    "function_call": None,
                },
                {"role": "user", "content": "again"},
            ],
            "store": False,
            "metadata": {"team": "a"},
            "user": "u-1",
            "service_tier": "auto",
            "parallel_tool_calls": True,
        },
    )
    assert r.status_code == 200, r.text


class _UpstreamOverASGI(OpenAIUpstreamEngine):
    """The openai engine talking to another llmhost app in the same process."""

    def __init__(self, upstream_app):
        super().__init__("http://upstream", model="fake-model")
        self.upstream_app = upstream_app

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.upstream_app), base_url="http://upstream"
        )
        self._healthy = True


@pytest.fixture
async def gateway():
    back = FakeEngine(
        model_id="fake-model", script=CALL_SCRIPT, context_length=4096, eos_after=len(CALL_SCRIPT)
    )
    back_app = create_app(back, open_settings())
    async with back_app.router.lifespan_context(back_app):
        await back_app.state.loader
        front_app = create_app(_UpstreamOverASGI(back_app), open_settings())
        async with front_app.router.lifespan_context(front_app):
            await front_app.state.loader
            transport = httpx.ASGITransport(app=front_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client, back


async def test_upstream_gets_the_fields_and_its_calls_come_back(gateway):
    c, back = gateway
    body = {"messages": USER, "tools": [WEATHER], "parallel_tool_calls": False}
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the upstream rendered the tools itself: they were forwarded, not dropped
    assert '"name": "get_weather"' in back.requests[-1].prompt

    r = await c.post("/v1/chat/completions", json={**body, "stream": True})
    events = [e for e in sse_events(r)[:-1] if e["choices"]]
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(args) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # an upstream refusal of a field is the client's 400
    r = await c.post(
        "/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}}
    )
    assert_error(r, 400, "response_format")
