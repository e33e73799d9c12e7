import pytest
from pydantic import ValidationError

from llmhost.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


def test_completion_defaults_follow_openai():
    r = CompletionRequest(prompt="hi")
    assert r.max_tokens == 16 and r.temperature == 1.0 and r.top_p == 1.0
    assert r.stop == [] and not r.stream and not r.include_usage


def test_prompt_forms():
    assert CompletionRequest(prompt="one").prompts == ["one"]
    assert CompletionRequest(prompt=["one"]).prompts == ["one"]
    assert CompletionRequest(prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]
    for bad in ([], [1, -2], [[1], []], [[1], [-1]], ["a"] * 129, [[1]] * 10_000):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt=bad)
    with pytest.raises(ValidationError, match="10000 prompts"):
        CompletionRequest(prompt=["x"] * 10_000)
    with pytest.raises(ValidationError, match="choices"):
        CompletionRequest(prompt=["a"] * 10, n=20)


def test_logit_bias_forms():
    assert CompletionRequest(prompt="x", logit_bias={"5": -100, "7": 2.5}).bias == (
        (5, -100.0),
        (7, 2.5),
    )
    for bad in ({"x": 1}, {"-1": 1}, {"5": 101}, {"5": -100.5}, {"05": 1, "5": 2}, {"٣": 1}):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt="x", logit_bias=bad)
    with pytest.raises(ValidationError, match="2000 logit_bias"):
        CompletionRequest(prompt="x", logit_bias={str(i): 1 for i in range(2000)})


def test_logprob_fields():
    assert (
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=20
        ).top_logprobs
        == 20
    )
    for bad in ({"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}, {"logprobs": 1}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **bad)
    assert CompletionRequest(prompt="x", logprobs=5, echo=True, max_tokens=0).max_tokens == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", -1),
        ("max_tokens", 0),  # only with echo
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -5),
        ("n", 0),
        ("n", 129),
        ("logprobs", 21),
        ("logprobs", -1),
        ("echo", "yes"),
        ("logit_bias", {"1": 200}),
        ("stop", [""]),
        ("stop", ["s"] * 17),
        ("presence_penalty", 3),
        ("max_tokens", "many"),
    ],
)
def test_completion_rejects(field, value):
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="hi", **{field: value})


def test_stop_string_normalised_to_list():
    assert CompletionRequest(prompt="x", stop="\n").stop == ["\n"]


def test_stream_options_need_stream():
    with pytest.raises(ValidationError, match="stream"):
        CompletionRequest(prompt="x", stream_options={"include_usage": True})
    r = CompletionRequest(prompt="x", stream=True, stream_options={"include_usage": True})
    assert r.include_usage


def test_chat_request():
    r = ChatCompletionRequest(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=5,
        max_tokens=9,
    )
    assert r.messages[1].text() == "ab"
    assert r.token_budget == 5
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).token_budget is None


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"content": "no role"}],
    ],
)
def test_chat_rejects(messages):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=messages)


def test_generate_request():
    assert GenerateRequest(prompt="p").max_length == 50
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="")
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", max_length=0)
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="p", unknown=1)
