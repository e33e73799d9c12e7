"""POST /v1/responses over httpx's ASGI transport with the scripted engine: the Response object and
the stream's typed events checked against the openai SDK's own models, the SDK itself driving
the app, tool calls both ways, and every refused field a 400 that names it."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import TypeAdapter

from llmhost.api import create_app
from llmhost.audit.store import SqliteAuditStore
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.errors import EngineError
from llmhost.security.auth import KeyStore
from llmhost.types import GenerationRequest
from tests.conftest import open_settings, require
from tests.integration.test_api import assert_error
from tests.integration.test_tools_api import CALL_SCRIPT, HERMES_TEMPLATE, _UpstreamOverASGI

openai = require("openai")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
async def env():
    engine = FakeEngine(
        model_id="fake-model", script=["Hello", " world", "!"], context_length=64, eos_after=3
    )
    app = create_app(engine, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, engine


@pytest.fixture
async def tools_env():
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


def parse_events(resp: httpx.Response) -> list[dict]:
    """The stream's events, each checked: `event:` names the data's type, the data is one of
    the SDK's ResponseStreamEvent models, and sequence numbers count up from 0."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: ") :])
        assert event["type"] == head[len("event: ") :]
        EVENTS.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def check_response(body: dict) -> Response:
    """`body` as the SDK's Response model reads it (validated, not just constructed)."""
    return Response.model_validate(body)


async def test_text_response(env):
    c, engine = env
    r = await c.post(
        "/v1/responses",
        json={
            "model": "fake-model",
            "input": "a b",
            "instructions": "Be terse.",
            "metadata": {"k": "v"},
            "store": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    resp = check_response(body)
    assert resp.output_text == "Hello world!"
    assert body["id"] == "resp_" + r.headers["x-request-id"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["incomplete_details"] is None and body["error"] is None
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    assert item["content"] == [
        {"type": "output_text", "text": "Hello world!", "annotations": [], "logprobs": []}
    ]
    prompt = engine.requests[-1].prompt
    assert body["usage"] == {
        "input_tokens": len(prompt.split()),
        "output_tokens": 3,
        "total_tokens": len(prompt.split()) + 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    # the settings are echoed; nothing is stored whatever `store` said
    assert body["store"] is False and body["metadata"] == {"k": "v"}
    assert body["instructions"] == "Be terse." and body["tools"] == []
    assert body["tool_choice"] == "auto" and body["text"] == {"format": {"type": "text"}}
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (1.0, 1.0, None)
    # instructions become the system message, first
    assert prompt.index("system\nBe terse.") < prompt.index("user\na b")
    assert engine.requests[-1].messages == (
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "a b"},
    )


async def test_sampling_reaches_the_engine(env):
    c, engine = env
    r = await c.post(
        "/v1/responses",
        json={
            "input": "a",
            "temperature": 0.2,
            "top_p": 0.5,
            "seed": 7,
            "max_output_tokens": 5,
            "user": "u1",
            "store": False,
            "truncation": "disabled",
            "include": [],
            "reasoning": None,
            "parallel_tool_calls": False,
        },
    )
    assert r.status_code == 200, r.text
    sp = engine.requests[-1].sampling
    assert (sp.temperature, sp.top_p, sp.seed, sp.max_tokens) == (0.2, 0.5, 7, 5)
    body = r.json()
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (0.2, 0.5, 5)
    assert body["user"] == "u1" and body["parallel_tool_calls"] is False


async def test_input_items_become_the_conversation(env):
    c, engine = env
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q1"}]},
        {
            "type": "message",
            "id": "msg_old",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "a1", "annotations": []}],
        },
        {"role": "user", "content": "q2"},
    ]
    r = await c.post("/v1/responses", json={"input": items})
    assert r.status_code == 200, r.text
    msgs = engine.requests[-1].messages
    assert [m["role"] for m in msgs] == ["developer", "user", "assistant", "user"]
    assert msgs[1]["content"] == [{"type": "text", "text": "q1"}]
    prompt = engine.requests[-1].prompt
    # the developer turn is the system turn to the template, as in chat
    assert prompt.index("system\nRules.") < prompt.index("q1") < prompt.index("a1")
    assert prompt.index("a1") < prompt.index("q2")


async def test_max_output_tokens_makes_it_incomplete(env):
    c, _ = env
    r = await c.post("/v1/responses", json={"input": "a", "max_output_tokens": 2})
    body = r.json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    assert check_response(body).output_text == "Hello world"
    assert body["usage"]["output_tokens"] == 2


async def test_stream_events(env):
    c, _ = env
    whole = (await c.post("/v1/responses", json={"input": "a"})).json()
    events = parse_events(await c.post("/v1/responses", json={"input": "a", "stream": True}))
    types = [e["type"] for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    item_id = events[2]["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 for d in deltas)
    assert "".join(d["delta"] for d in deltas) == "Hello world!"
    assert events[-4]["text"] == "Hello world!"
    final = events[-1]["response"]
    assert final["id"] == created["id"] and final["status"] == "completed"
    assert final["output"] == [events[-2]["item"]]
    assert check_response(final).output_text == check_response(whole).output_text
    assert final["usage"] == whole["usage"]


async def test_stream_cut_by_max_output_tokens(env):
    c, _ = env
    r = await c.post("/v1/responses", json={"input": "a", "stream": True, "max_output_tokens": 1})
    events = parse_events(r)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert check_response(final).output_text == "Hello"


async def test_the_openai_sdk_reads_it(env):
    c, _ = env
    client = openai.AsyncOpenAI(
        base_url="http://t/v1", api_key="unused", http_client=c, max_retries=0
    )
    resp = await client.responses.create(model="fake-model", input="a", instructions="x")
    assert resp.output_text == "Hello world!" and resp.status == "completed"
    text = ""
    async with client.responses.stream(model="fake-model", input="a") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = await stream.get_final_response()
    assert text == final.output_text == "Hello world!"
    kinds = [e.type async for e in await client.responses.create(input="a", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(input="a", previous_response_id="resp_1")
    assert err.value.body["param"] == "previous_response_id"


async def test_function_call(tools_env):
    c, engine = tools_env
    r = await c.post("/v1/responses", json={"input": "weather in Paris?", "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    body = r.json()
    check_response(body)
    message, call = body["output"]
    assert message["content"][0]["text"] == "Let me look."
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert body["tools"] == [WEATHER]
    # the tool reached the template in the chat shape
    assert '"name": "get_weather"' in engine.requests[-1].prompt
    assert '"function": {"name": "get_weather"' in engine.requests[-1].prompt

    # tool_choice none: plain text, no tools offered
    r = await c.post(
        "/v1/responses", json={"input": "x", "tools": [WEATHER], "tool_choice": "none"}
    )
    (item,) = r.json()["output"]
    assert item["type"] == "message" and "<tool_call>" in item["content"][0]["text"]
    assert "TOOLS:" not in engine.requests[-1].prompt


async def test_function_call_streamed(tools_env):
    c, _ = tools_env
    body = {"input": "weather in Paris?", "tools": [WEATHER]}
    whole = (await c.post("/v1/responses", json=body)).json()
    events = parse_events(await c.post("/v1/responses", json={**body, "stream": True}))
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [a["item"]["type"] for a in added] == ["message", "function_call"]
    call = added[1]["item"]
    assert call["name"] == "get_weather" and call["status"] == "in_progress"
    assert call["arguments"] == "" and call["call_id"].startswith("call_")
    args = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert all(a["item_id"] == call["id"] and a["output_index"] == 1 for a in args)
    text = "".join(a["delta"] for a in args)
    assert json.loads(text) == {"city": "Paris"}
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == text
    # the message was closed before the call began
    types = [e["type"] for e in events]
    assert types.index("response.output_text.done") < types.index(
        "response.output_item.added", types.index("response.output_item.added") + 1
    )
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    strip = [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in final["output"]]
    same = [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in whole["output"]]
    assert strip == same
    # the SDK's stream helper puts the same items together
    client = openai.AsyncOpenAI(
        base_url="http://t/v1", api_key="unused", http_client=c, max_retries=0
    )
    async with client.responses.stream(model="fake-model", **body) as stream:
        got = await stream.get_final_response()
    assert got.output_text == "Let me look."
    sdk_call = got.output[1]
    assert sdk_call.type == "function_call" and sdk_call.name == "get_weather"
    assert json.loads(sdk_call.arguments) == {"city": "Paris"}


async def test_function_call_round_trip(tools_env):
    c, engine = tools_env
    items = [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "message", "role": "assistant", "content": "Let me look."},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]
    r = await c.post("/v1/responses", json={"input": items, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    msgs = engine.requests[-1].messages
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    assert msgs[1]["content"] == "Let me look."
    assert msgs[1]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    prompt = engine.requests[-1].prompt
    assert "sunny, 21 C" in prompt and '"city": "Paris"' in prompt
    # two calls in a row are one assistant turn
    items = [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "b", "output": "B"},
        {"type": "function_call_output", "call_id": "a", "output": "A"},
    ]
    r = await c.post("/v1/responses", json={"input": items})
    assert r.status_code == 200, r.text
    msgs = engine.requests[-1].messages
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert msgs[1].get("content") is None
    assert [tc["id"] for tc in msgs[1]["tool_calls"]] == ["a", "b"]


async def test_upstream_calls_come_back_as_items():
    back = FakeEngine(
        model_id="fake-model", script=CALL_SCRIPT, context_length=4096, eos_after=len(CALL_SCRIPT)
    )
    back_app = create_app(back, open_settings())
    async with back_app.router.lifespan_context(back_app):
        await back_app.state.loader
        front = create_app(_UpstreamOverASGI(back_app), open_settings())
        async with front.router.lifespan_context(front):
            await front.state.loader
            transport = httpx.ASGITransport(app=front)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                body = {"input": "weather?", "tools": [WEATHER], "instructions": "Sys."}
                for stream in (False, True):
                    r = await c.post("/v1/responses", json={**body, "stream": stream})
                    final = parse_events(r)[-1]["response"] if stream else r.json()
                    check_response(final)
                    call = final["output"][-1]
                    assert call["type"] == "function_call" and call["name"] == "get_weather"
                    assert json.loads(call["arguments"]) == {"city": "Paris"}
                    assert call["call_id"].startswith("call_")
                    # the upstream got the tools (chat-shaped) and rendered them itself
                    assert '"name": "get_weather"' in back.requests[-1].prompt
                    assert back.requests[-1].prompt.startswith("<|im_start|>system\nSys.")


class _FailingEngine(FakeEngine):
    """Fails after two tokens when the prompt says so."""

    async def stream(self, request: GenerationRequest):
        n = 0
        async for d in super().stream(request):
            yield d
            n += 1
            if n == 2 and "fail" in request.prompt:
                raise EngineError("the engine fell over")


async def test_engine_failure_mid_stream_is_a_failed_event():
    engine = _FailingEngine(model_id="fake-model", script=["Hello", " world", "!"], eos_after=3)
    app = create_app(engine, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/responses", json={"input": "fail", "stream": True})
            events = parse_events(r)
            error, failed = events[-2:]
            assert error["type"] == "error" and error["message"] == "the engine fell over"
            assert error["code"] == "engine_error"
            assert failed["type"] == "response.failed"
            resp = failed["response"]
            assert resp["status"] == "failed" and resp["usage"] is None
            assert resp["error"] == {"code": "server_error", "message": "the engine fell over"}
            (item,) = resp["output"]
            assert item["status"] == "incomplete"
            assert item["content"][0]["text"] == "Hello world"
            check_response(resp)
            assert "response.completed" not in [e["type"] for e in events]
            # the server goes on
            r = await c.post("/v1/responses", json={"input": "a"})
            assert r.json()["output"][0]["content"][0]["text"] == "Hello world!"


async def test_a_shutdown_ends_the_stream_in_band():
    engine = FakeEngine(model_id="fake-model", script=["Hello", " world", "!"], eos_after=3)
    app = create_app(engine, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            app.state.drain.expired = True
            events = parse_events(
                await c.post("/v1/responses", json={"input": "a", "stream": True})
            )
    error, failed = events[-2:]
    assert error["type"] == "error" and error["code"] == "shutting_down"
    assert failed["type"] == "response.failed"
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hello"


async def test_audited_like_chat(tmp_path):
    settings = Settings(home=tmp_path, rate_limit_rps=0, audit_prompt_mode="full")
    keys = KeyStore(settings.keys_db)
    key, _ = keys.create("alice")
    keys.close()
    app = create_app(
        FakeEngine(model_id="fake-model", script=["Hello", " world", "!"], eos_after=3), settings
    )
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as c:
            assert (await c.post("/v1/responses", json={"input": "q one"})).status_code == 200
            r = await c.post("/v1/responses", json={"input": "q two", "stream": True})
            parse_events(r)
            r = await c.post("/v1/responses", json={"input": "q", "previous_response_id": "x"})
            assert r.status_code == 400
    store = SqliteAuditStore(tmp_path / "audit.db")
    try:
        found = store.search()
    finally:
        store.close()
    assert [(f.route, f.status, f.user_id) for f in found] == [
        ("/v1/responses", 200, "alice"),
        ("/v1/responses", 200, "alice"),
        ("/v1/responses", 400, "alice"),
    ]
    assert "q one" in found[0].prompt and "q two" in found[1].prompt
    assert [f.completion_tokens for f in found] == [3, 3, 0]
    assert [f.response_length for f in found[:2]] == [len("Hello world!")] * 2


async def test_metered_like_chat(env):
    c, _ = env
    assert (await c.post("/v1/responses", json={"input": "a"})).status_code == 200
    metrics = (await c.get("/metrics")).text
    assert any(
        line.startswith("llmhost_requests_total{")
        and 'route="/v1/responses"' in line
        and 'status="200"' in line
        and line.endswith(" 1.0")
        for line in metrics.splitlines()
    ), metrics
    spec = (await c.get("/openapi.json")).json()
    assert "/v1/responses" in spec["paths"]


@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"input": "a", "previous_response_id": "resp_1"}, 400, "previous_response_id", "stored"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input", "item_reference"),
        ({"input": [{"type": "web_search_call"}]}, 400, "input", "web_search_call"),
        ({"input": [{"role": "tool", "content": "x"}]}, 400, "input", "role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            400,
            "input",
            "text only",
        ),
        ({"input": [{"role": "user", "content": "a", "bogus": 1}]}, 400, "input", "unknown"),
        ({"input": []}, 400, "input", "empty"),
        ({"input": 5}, 400, "input", "string or a list"),
        ({}, 400, "input", "required"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
            400,
            "input",
            "no earlier function_call",
        ),
        ({"input": "a", "tools": [{"type": "web_search"}]}, 400, "tools", "only function"),
        ({"input": "a", "tools": [{"type": "file_search"}]}, 400, "tools", "file_search"),
        ({"input": "a", "tools": [{"type": "function", "name": "a b"}]}, 400, "tools", "letters"),
        (
            {"input": "a", "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools",
            "unknown",
        ),
        ({"input": "a", "tools": [WEATHER] * 129}, 400, "tools", "at most 128"),
        ({"input": "a", "tools": [WEATHER, WEATHER]}, 400, "tools", "two tools"),
        (
            {
                "input": "a",
                "tools": [{**WEATHER, "parameters": {"type": "object", "required": 3}}],
            },
            400,
            "tools",
            "not a valid JSON schema",
        ),
        ({"input": "a", "tool_choice": "required"}, 400, "tool_choice", "only allowed"),
        (
            {"input": "a", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "g"}},
            400,
            "tool_choice",
            "not in tools",
        ),
        (
            {"input": "a", "tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}},
            400,
            "tool_choice",
            "",
        ),
        # the fake engine constrains nothing: a forced call or a schema is refused by name
        (
            {"input": "a", "tools": [WEATHER], "tool_choice": "required"},
            400,
            "tool_choice",
            "not supported by this model's engine",
        ),
        (
            {"input": "a", "text": {"format": {"type": "json_object"}}},
            400,
            "text.format",
            "text.format 'json_object' is not supported",
        ),
        (
            {
                "input": "a",
                "text": {"format": {"type": "json_schema", "name": "t", "schema": {"type": 7}}},
            },
            400,
            "text.format",
            "text.format.schema is not a valid JSON schema",
        ),
        ({"input": "a", "text": {"format": {"type": "json_schema"}}}, 400, "text", "needs"),
        ({"input": "a", "text": {"verbosity": "low"}}, 400, "text", "unknown"),
        ({"input": "a", "include": ["file_search_call.results"]}, 400, "include", "include"),
        ({"input": "a", "reasoning": {"effort": "low"}}, 400, "reasoning", "reasoning"),
        ({"input": "a", "reasoning": {}}, 400, "reasoning", "reasoning"),
        ({"input": "a", "previous_response_id": ""}, 400, "previous_response_id", "stored"),
        ({"input": "a", "truncation": "auto"}, 400, "truncation", "disabled"),
        ({"input": "a", "background": True}, 400, "background", "unknown field"),
        ({"input": "a", "max_output_tokens": 0}, 400, "max_output_tokens", ""),
        ({"input": "a", "max_output_tokens": 999}, 400, "max_output_tokens", "context"),
        ({"input": "a", "temperature": 3}, 400, "temperature", ""),
        ({"input": "a", "stream": "yes"}, 400, "stream", ""),
        ({"input": "a", "metadata": {str(i): "v" for i in range(17)}}, 400, "metadata", "16"),
        ({"input": "a", "model": "gpt-9"}, 404, "model", "gpt-9"),
        ({"input": "\ud800"}, 400, "input", "lone surrogate"),
    ],
)
async def test_bad_requests_are_refused_by_name(env, body, status, param, fragment):
    c, engine = env
    before = len(engine.requests)
    # json.dumps escapes a lone surrogate as JSON allows; httpx's own encoder would refuse it
    raw = json.dumps(body)
    r = await c.post("/v1/responses", content=raw, headers={"content-type": "application/json"})
    err = assert_error(r, status, fragment)
    assert err["param"] == param, err
    assert len(engine.requests) == before  # nothing was generated
    # and the server goes on serving
    ok = await c.post("/v1/responses", json={"input": "a"})
    assert ok.status_code == 200 and ok.json()["status"] == "completed"
