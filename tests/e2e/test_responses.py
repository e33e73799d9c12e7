"""The Responses API (`POST /v1/responses`) of a real `llmhost serve --demo`, driven with the
official openai SDK: text, streams, a function tool round trip, a JSON schema answer, a budget
cut short, and refused fields that leave the server serving. The demo model has random weights,
so the tests check what the server guarantees (constrained output parses and validates), not
what the model says."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import require
from tests.e2e.conftest import Server

openai = require("openai")

MODEL = "llmhost-demo"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather forecast of a city.",
    "parameters": WEATHER_PARAMS,
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
LONG = {
    "type": "object",
    "properties": {"essay": {"type": "string", "minLength": 400}},
    "required": ["essay"],
}


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


def test_text(client):
    resp = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
    )
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status in ("completed", "incomplete")
    assert resp.output_text.strip()
    assert resp.usage.input_tokens > 5 and 0 < resp.usage.output_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.instructions == "You are terse." and resp.model == MODEL


def test_streams(client):
    # a schema makes the random model finish (status completed) well within the budget
    person = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    ask = {
        "model": MODEL,
        "input": "Invent a person.",
        "text": person,
        "max_output_tokens": 300,
        "temperature": 0,
    }
    whole = client.responses.create(**ask)
    assert whole.status == "completed" and whole.output_text
    events = list(client.responses.create(**ask, stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == whole.output_text
    with client.responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_max_output_tokens_is_incomplete(client):
    resp = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "Write a long essay about the sea."}],
        max_output_tokens=3,
        # an answer this schema allows is never done in 3 tokens
        text={"format": {"type": "json_schema", "name": "long", "schema": LONG}},
    )
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3
    assert resp.output[0].status == "incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip(client, stream):
    ask = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    settings = {
        "model": MODEL,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 200,
        "extra_body": {"seed": 7},  # an extension: not in the SDK's signature
    }
    if stream:
        with client.responses.stream(input=ask, **settings) as s:
            argument_deltas = [
                e.delta for e in s if e.type == "response.function_call_arguments.delta"
            ]
            resp = s.get_final_response()
    else:
        resp = client.responses.create(input=ask, **settings)
    assert resp.status == "completed"
    (call,) = [item for item in resp.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    if stream:
        assert "".join(argument_deltas) == call.arguments
    # the call and its output sent back: the model answers in text
    follow = client.responses.create(
        model=MODEL,
        input=[
            *ask,
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    assert follow.status in ("completed", "incomplete")
    assert [item.type for item in follow.output] == ["message"]
    # the call and its output reached the prompt
    alone = client.responses.create(model=MODEL, input=ask, max_output_tokens=1)
    assert follow.usage.input_tokens > alone.usage.input_tokens + 10
    # the SDK's own output items replayed as input work too
    again = client.responses.create(
        model=MODEL,
        input=[
            *ask,
            *resp.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": "rain"},
        ],
        max_output_tokens=4,
    )
    assert again.status in ("completed", "incomplete")


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_output_validates(client, seed):
    resp = client.responses.create(
        model=MODEL,
        input="Invent a person.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
        },
        max_output_tokens=300,
        extra_body={"seed": seed},
    )
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, None),
    ],
)
def test_refused_fields_are_400s_and_the_server_goes_on(client, fields, param):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == (param or "text.format")
    # greedy: sampled, the random demo model ends its turn at once about one time in a
    # hundred, which says nothing of the server
    resp = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0)
    assert resp.usage.output_tokens >= 1, str(resp.model_dump())
