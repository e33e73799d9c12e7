"""The rest of the OpenAI surface against a real `llmhost serve --demo`, with the clients that
use it: the openai SDK (logprobs, top_logprobs, n, echo, prompt lists, logit_bias), LangChain's
legacy `OpenAI(...).batch` (a prompt list per call) and litellm's text completion with a list
prompt."""

from __future__ import annotations

import math

import pytest

from tests.conftest import require

openai = require("openai")

MODEL = "llmhost-demo"
ASK = [{"role": "user", "content": "Name a setting of the server."}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_logprobs_and_n(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=6,
        n=3,
        seed=11,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == 6
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 4
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
            assert bytes(entry.bytes).decode("utf-8", "replace")
            probs = [math.exp(t.logprob) for t in entry.top_logprobs]
            assert sum(probs) <= 1.0 + 1e-4
        spelled = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
        assert spelled == choice.message.content
    # choice 1 is the request alone with seed + 1
    one = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, seed=12, extra_body={"ignore_eos": True}
    )
    assert one.choices[0].message.content == r.choices[1].message.content


def test_streamed_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, logprobs=True, stream=True, temperature=0
    )
    tokens = []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                tokens += [e.token for e in c.logprobs.content]
    assert 1 <= len(tokens) <= 5


def test_completion_echo_logprobs_and_prompt_list(client):
    r = client.completions.create(
        model=MODEL,
        prompt=["The queue", "The slots are"],
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("The queue")
    assert r.choices[1].text.startswith("The slots are")
    lp = r.choices[1].logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
    # score a text without generating (lm-eval's loglikelihood request)
    scored = client.completions.create(
        model=MODEL, prompt="The queue is full", max_tokens=0, echo=True, logprobs=0
    )
    assert scored.choices[0].text == "The queue is full"
    assert scored.usage.completion_tokens == 0


def test_logit_bias_forces_a_token(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The queue",
        max_tokens=4,
        temperature=0.7,
        logit_bias={"42": 100},
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert len(r.choices[0].logprobs.tokens) == 4 and len(set(r.choices[0].logprobs.tokens)) == 1


@pytest.mark.parametrize(
    "body, param",
    [
        ({"n": 99}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
    ],
)
def test_bad_values_are_400s(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **body)
    assert err.value.body["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1).choices


def test_bad_prompts_are_400s(client):
    for prompt in ([], ["x"] * 10_000, [[1, 2], [10**8]]):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        assert err.value.body["param"] == "prompt"


def test_langchain_legacy_batch(server):
    require("langchain_openai")
    from langchain_openai import OpenAI

    llm = OpenAI(
        model=MODEL,
        base_url=server.url + "/v1",
        api_key="unused",
        max_retries=0,
        max_tokens=4,
        temperature=0,
        batch_size=5,
    )
    prompts = [f"Setting number {i} is" for i in range(7)]
    out = llm.batch(prompts)
    assert len(out) == 7 and all(isinstance(t, str) for t in out)
    # each answer is its own prompt's: the same as asking for it alone
    assert out[3] == llm.invoke(prompts[3])


def test_litellm_list_prompt(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = require("litellm")
    r = litellm.text_completion(
        model=f"openai/{MODEL}",
        api_base=server.url + "/v1",
        api_key="unused",
        prompt=["The queue", "The slots"],
        max_tokens=3,
        temperature=0,
    )
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
