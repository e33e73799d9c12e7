"""Agents and structured output against a real `llmhost serve --demo`, with the clients users
bring: the openai SDK (`parse`, streamed tool calls), LangChain's ChatOpenAI (bind_tools with a
tool-result round trip, with_structured_output both ways) and litellm. The demo model has random
weights, so its free choices are noise: the tests check what constrained decoding guarantees
(a forced call always parses and validates; a json_schema answer always validates)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.conftest import require
from tests.e2e.conftest import Server

openai = require("openai")

MODEL = "llmhost-demo"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city.",
        "parameters": WEATHER_PARAMS,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    active: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("home"), "--demo", "--parallel", "4", "--ctx-size", "4096")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_openai_parse_with_a_pydantic_model(client, seed):
    done = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        max_completion_tokens=400,
        seed=seed,
        temperature=1.0,
    )
    person = done.choices[0].message.parsed
    assert isinstance(person, Person)
    assert done.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [5, 6])
def test_json_object_mode(client, seed):
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
        max_completion_tokens=200,
        seed=seed,
    )
    text = done.choices[0].message.content
    # Any object is allowed, so random weights may write one long key until the budget ends;
    # what was written is still the start of an object, and a finished answer parses.
    assert text.startswith("{")
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert done.choices[0].finish_reason == "length"


@pytest.mark.parametrize("choice", ["required", "named"])
def test_streamed_forced_tool_calls(client, choice):
    tool_choice = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_completion_tokens=400,
        stream=True,
        seed=7,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        assert not ch.delta.content  # never markup or JSON as text
        for tc in ch.delta.tool_calls or ():
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None
                entry["id"] = tc.id
                entry["name"] = tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["id"] and (choice == "required" or call["name"] == "get_time")
    check_call(call["name"], call["arguments"])


def test_langchain_bind_tools_round_trip(server):
    require("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", max_retries=0, max_tokens=300
    )
    agent = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather")
    history = [HumanMessage("What is the weather in Paris for 3 days?")]
    ai = agent.invoke(history)
    assert len(ai.tool_calls) == 1
    call = ai.tool_calls[0]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_PARAMS)
    history += [ai, ToolMessage(content="sunny, 21 C", tool_call_id=call["id"])]
    # the tool result goes back (tool_call_id and the assistant's tool_calls intact)
    answer = llm.bind_tools([WEATHER, TIME]).invoke(history)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, method):
    require("langchain_openai")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", max_retries=0, max_tokens=400
    )
    # strict: the schema closes the object (no extra keys), so even random weights finish;
    # without it a random model may add keys until max_tokens.
    structured = llm.with_structured_output(Person, method=method, strict=True)
    for _ in range(3):
        assert isinstance(structured.invoke("Invent a person."), Person)


def test_litellm_with_tools(server, monkeypatch):
    # offline: litellm reads its bundled model-cost map instead of fetching it
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = require("litellm")
    done = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=server.url + "/v1",
        api_key="unused",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        # one call: with parallel calls allowed a random model may add calls until max_tokens
        parallel_tool_calls=False,
        max_tokens=400,
    )
    calls = done.choices[0].message.tool_calls
    assert calls and done.choices[0].finish_reason == "tool_calls"
    for call in calls:
        check_call(call.function.name, call.function.arguments)


BAD_SCHEMAS = {
    # a reference cycle with nothing in it: no JSON value can ever match
    "cycle": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "unsatisfiable": {"type": "object", "allOf": [{"type": "string"}]},
    "bad ref": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
    "empty enum": {"type": "object", "properties": {"x": {"enum": []}}, "required": ["x"]},
}


@pytest.mark.parametrize("name", sorted(BAD_SCHEMAS))
@pytest.mark.parametrize("where", ["response_format", "tools"])
def test_bad_schemas_are_400s_before_generation(server, name, where):
    schema = BAD_SCHEMAS[name]
    body: dict = {"model": MODEL, "messages": ASK, "max_tokens": 32}
    if where == "tools":
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        body |= {"tools": [tool], "tool_choice": "required"}
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == where and err["message"]
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 4},
        timeout=60,
    )
    assert ok.status_code == 200


def test_recursive_schema_is_served(client):
    """A recursive schema with a base case (a tree) is a valid request, as it is for OpenAI."""
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v", "kids"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    }
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A tree."}],
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tree}},
        max_completion_tokens=300,
        seed=3,
    )
    text = done.choices[0].message.content
    if done.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), tree)
    else:
        assert text.startswith("{")


def _stream_calls(client, **kw) -> tuple[dict[int, dict], str, str | None]:
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or ():
            entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
            entry["name"] = entry["name"] or (tc.function.name if tc.function else None)
            entry["arguments"] += (tc.function.arguments if tc.function else None) or ""
        finish = ch.finish_reason or finish
    return calls, content, finish


@pytest.mark.parametrize("max_tokens", [3, 5, 8])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_cut_short_reads_the_same_streamed_or_not(client, choice, max_tokens):
    tool_choice = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_weather"}}
    )
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_completion_tokens=max_tokens,
        seed=3,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    calls, content, finish = _stream_calls(client, **kw)
    assert whole.finish_reason == finish == "length"
    assert not whole.message.content and not content  # JSON never leaks into the text
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()]
    assert got == [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


def test_a_tool_without_parameters_is_called_with_none(client):
    ping = {"type": "function", "function": {"name": "ping"}}
    done = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[ping],
        tool_choice={"type": "function", "function": {"name": "ping"}},
        max_completion_tokens=50,
        seed=1,
    )
    (call,) = done.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {}
    assert done.choices[0].finish_reason == "tool_calls"


def test_stop_with_structured_output_is_refused(server):
    body = {
        "model": MODEL,
        "messages": ASK,
        "stop": ["a"],
        "response_format": {"type": "json_object"},
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
