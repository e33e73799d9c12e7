"""Tool-call parsing: every family whole and streamed, malformed markup, forced calls, cost."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmhost.engines import toolcalls as tc

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "search"}},
]

DS_CALLS = "<｜tool▁calls▁begin｜>"
DS_CALL = "<｜tool▁call▁begin｜>"
DS_SEP = "<｜tool▁sep｜>"
DS_END = "<｜tool▁call▁end｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"

Factory = Callable[[], tc.ToolCallParser]

# (family, output, expected content, expected [(name, arguments)])
GOOD: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    (
        "hermes",
        'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"arguments": {"q": "a \\"}\\" <b>"}, "name": "search"}\n'
        "</tool_call>",
        "Let me check.",
        [("get_weather", '{"city": "Paris"}'), ("search", '{"q": "a \\"}\\" <b>"}')],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": 1}"}\n</tool_call>',
        None,
        [("search", '{"q": 1}')],
    ),
    (
        "hermes",
        "Just text, < and <tool but no call.\n",
        "Just text, < and <tool but no call.\n",
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "id": [1, {"x": "]"}], "arguments": {}}',
        None,
        [("f", "{}")],
    ),
    (
        "llama3",
        ' {"name": "get_weather", "parameters": {"city": "Oslo", "n": [1, 2.5e3, true, null]}}'
        '; {"name": "search", "arguments": {}}',
        None,
        [("get_weather", '{"city": "Oslo", "n": [1, 2.5e3, true, null]}'), ("search", "{}")],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}',
        None,
        [("search", '{"q": "x"}')],
    ),
    ("llama3", "Hello {not a call}", "Hello {not a call}", []),
    ("llama3", "<|pyt", "<|pyt", []),
    (
        "mistral",
        'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "search", "arguments": {"q": "[TOOL_CALLS]"}}]',
        "Sure.",
        [("get_weather", '{"city": "Rome"}'), ("search", '{"q": "[TOOL_CALLS]"}')],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]search[CALL_ID]a1b2c3d4e'
        '[ARGS]{"q": "}"}',
        None,
        [("get_weather", '{"city": "Rome"}'), ("search", '{"q": "}"}')],
    ),
    ("mistral", "A [TOOL] and [TOOL_CALL text", "A [TOOL] and [TOOL_CALL text", []),
    (
        "deepseek",
        f"Checking.{DS_CALLS}{DS_CALL}function{DS_SEP}get_weather\n```json\n"
        f'{{"city": "Lima"}}\n```{DS_END}\n{DS_CALL}function{DS_SEP}search\n```json\n'
        f'{{"q": "```"}}\n```{DS_END}{DS_CALLS_END}',
        "Checking.",
        [("get_weather", '{"city": "Lima"}'), ("search", '{"q": "```"}')],
    ),
    (
        "deepseek",
        f'{DS_CALLS}{DS_CALL}get_weather{DS_SEP}{{"city": "Tokyo"}}{DS_END}{DS_CALLS_END}',
        None,
        [("get_weather", '{"city": "Tokyo"}')],
    ),
    (
        "json",
        '```json\n{"name": "get_weather", "arguments": {"city": "Kyiv"}}\n```',
        None,
        [("get_weather", '{"city": "Kyiv"}')],
    ),
    (
        "json",
        '[{"name": "get_weather", "arguments": {}}, {"name": "search", "parameters": {"q": 1}}]',
        None,
        [("get_weather", "{}"), ("search", '{"q": 1}')],
    ),
    ("json", "The answer is 42.", "The answer is 42.", []),
]

BAD: list[tuple[str, str]] = [
    ("hermes", 'Hi <tool_call>\n{"name": "x"}\n</tool_call>'),  # no arguments
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("hermes", "<tool_call>\nnot json\n</tool_call> after"),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": '),  # never closes
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>'),  # invalid JSON
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),  # not an object
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'),
    ("llama3", '{"name": "Bob", "age": 3}'),
    ("llama3", "<|python_tag|>import math"),
    ("mistral", "[TOOL_CALLS]not a name[ARGS]{}"),
    ("mistral", "[TOOL_CALLS]f[ARGS]{"),
    ("deepseek", f"{DS_CALLS}{DS_CALL}function{DS_SEP}f\n```json\n{{oops}}\n```{DS_END}"),
    ("deepseek", f"{DS_CALLS}oops"),
    ("json", '```json\n{"a": 1}\n```'),
    ("json", '{"name": "f", "arguments": {"a": 1}'),
]


def run(factory: Factory, pieces: Sequence[str]) -> tuple[str, list[tuple[str, str]], bool]:
    """Feed the pieces; check the stream's own invariants; return (content, calls, malformed)."""
    parser = factory()
    events: list[tc.Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, tc.Content))
    starts = [e for e in events if isinstance(e, tc.CallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    args = {
        s.index: "".join(
            e.fragment for e in events if isinstance(e, tc.CallArgs) and e.index == s.index
        )
        for s in starts
    }
    for call in parser.calls:
        index = next(s.index for s in starts if s.id == call.id)
        assert args[index] == call.arguments
        assert isinstance(json.loads(call.arguments), dict)
    for event in events:
        if isinstance(event, tc.CallArgs):
            assert any(s.index == event.index for s in starts[: event.index + 1])
    calls = [(s.name, args[s.index]) for s in starts]
    if not parser.malformed:
        assert calls == [(c.name, c.arguments) for c in parser.calls]
    return content, calls, parser.malformed


def splits(text: str) -> list[list[str]]:
    """Every two-piece split, and one character at a time."""
    out = [[text[:k], text[k:]] for k in range(len(text) + 1)]
    out.append(list(text))
    return out


@pytest.mark.parametrize(("family", "text", "content", "calls"), GOOD)
def test_whole_output(family: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = tc.parse(tc.make_parser(family, TOOLS), text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(
        c.id.startswith("call_") and len(c.id) == 29 for c in got_calls if family != "mistral"
    )


@pytest.mark.parametrize(("family", "text", "content", "calls"), GOOD)
def test_streamed_at_every_boundary(
    family: str, text: str, content: str | None, calls: list
) -> None:
    whole = run(lambda: tc.make_parser(family, TOOLS), [text])
    assert not whole[2]
    assert whole[1] == calls
    for pieces in splits(text):
        assert run(lambda: tc.make_parser(family, TOOLS), pieces) == whole, pieces


@pytest.mark.parametrize(("family", "text"), BAD)
def test_malformed_is_content(family: str, text: str) -> None:
    assert tc.parse(tc.make_parser(family), text) == (text, [])
    whole = run(lambda: tc.make_parser(family), [text])
    assert whole[2]
    for pieces in splits(text):
        assert run(lambda: tc.make_parser(family), pieces) == whole, pieces


@pytest.mark.parametrize(("family", "text"), BAD)
def test_malformed_before_a_call_streams_back_raw(family: str, text: str) -> None:
    content, calls, _ = run(lambda: tc.make_parser(family), [text])
    if not calls:
        # Nothing was committed, so every character comes back as content.
        assert content == text


MARKERS = {
    "hermes": "<tool_call>",
    "mistral": "[TOOL_CALLS]",
    "deepseek": DS_CALLS,
}


@pytest.mark.parametrize(("family", "text", "content", "calls"), [g for g in GOOD if g[3]])
def test_markup_never_leaks_as_content(
    family: str, text: str, content: str | None, calls: list
) -> None:
    for pieces in splits(text):
        parser = tc.make_parser(family)
        seen = ""
        for piece in pieces:
            seen += "".join(e.text for e in parser.feed(piece) if isinstance(e, tc.Content))
        seen += "".join(e.text for e in parser.finish() if isinstance(e, tc.Content))
        assert seen == (content or "")
        for marker in (*MARKERS.values(), "{", "<|python_tag|>", "```"):
            assert marker not in seen


@pytest.mark.parametrize("family", sorted(MARKERS))
def test_partial_marker_held_back_only_while_undecided(family: str) -> None:
    marker = MARKERS[family]
    parser = tc.make_parser(family)
    assert parser.feed("Hello" + marker[:-1]) == [tc.Content("Hello")]
    # Not the marker after all: the held text comes out with what follows.
    assert parser.feed("!") == [tc.Content(marker[:-1] + "!")]
    parser = tc.make_parser(family)
    assert parser.feed("Hello " + marker[:3]) == [tc.Content("Hello")]
    assert [e for e in parser.feed(marker[3:]) if isinstance(e, tc.Content)] == []


def test_call_start_comes_with_the_name_and_arguments_stream() -> None:
    parser = tc.make_parser("hermes")
    assert parser.feed('<tool_call>\n{"name": "get_weather"') == []
    events = parser.feed(', "arguments": {"ci')
    assert [type(e) for e in events] == [tc.CallStart, tc.CallArgs]
    assert events[0].name == "get_weather" and events[1] == tc.CallArgs(0, '{"ci')
    assert parser.feed('ty": "Paris"}') == [tc.CallArgs(0, 'ty": "Paris"}')]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"city": "Paris"}'


def test_arguments_before_name_are_held_until_the_name() -> None:
    parser = tc.make_parser("hermes")
    assert parser.feed('<tool_call>{"arguments": {"q": "x"}, ') == []
    events = parser.feed('"name": "search"}</tool_call>')
    assert [type(e) for e in events] == [tc.CallStart, tc.CallArgs]
    assert events[1].fragment == '{"q": "x"}'


def test_content_none_only_with_calls() -> None:
    assert tc.parse(tc.make_parser("hermes"), "") == ("", [])
    assert tc.parse(tc.make_parser("hermes"), "  \n") == ("  \n", [])
    content, calls = tc.parse(
        tc.make_parser("hermes"), '\n<tool_call>{"name":"f","arguments":{}}</tool_call>\n'
    )
    assert content is None and len(calls) == 1


def test_text_after_calls_is_content() -> None:
    text = '<tool_call>{"name":"f","arguments":{}}</tool_call>\nDone.'
    assert tc.parse(tc.make_parser("hermes"), text)[0] == "\nDone."


def test_mistral_ids_are_nine_alphanumerics() -> None:
    _, calls = tc.parse(tc.make_parser("mistral"), "[TOOL_CALLS]f[ARGS]{}")
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


@pytest.mark.parametrize(
    ("template", "family"),
    [
        (
            "{%- for tool in tools %}<tool_call>\n{{ tool | tojson }}\n</tool_call>{% endfor %}",
            "hermes",
        ),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3"),
        ("{%- if message.role == 'ipython' %}", "llama3"),
        ("{{- '[TOOL_CALLS][' }}", "mistral"),
        ("{{'<｜Assistant｜><｜tool▁calls▁begin｜>'}}", "deepseek"),
        ("{{ messages[0]['content'] }}", "json"),
        (None, "json"),
        ("", "json"),
    ],
)
def test_detect(template: str | None, family: str) -> None:
    assert tc.detect(template) == family


def test_registry() -> None:
    assert set(tc.PARSERS) == {"hermes", "llama3", "mistral", "deepseek", "json"}
    for name in tc.PARSERS:
        assert isinstance(tc.make_parser(name, TOOLS), tc.ToolCallParser)
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tc.make_parser("nope", TOOLS)
    with pytest.raises(TypeError):
        tc.PARSERS["x"] = tc.JsonParser  # type: ignore[index]


# -- forced calls ----------------------------------------------------------------------------


def test_named_constraint_is_the_parameters_schema() -> None:
    c = tc.named_constraint(TOOLS[0])
    assert c.kind == "json_schema"
    assert json.loads(c.source) == TOOLS[0]["function"]["parameters"]
    assert c.source == tc.named_constraint(TOOLS[0]).source
    # no parameters declared: the function takes none (OpenAI's reading)
    assert json.loads(tc.named_constraint(TOOLS[1]).source) == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


def test_required_constraint() -> None:
    c = tc.required_constraint(TOOLS, parallel=False)
    schema = json.loads(c.source)
    assert c.kind == "json_schema" and " " not in c.source
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    variants = schema["items"]["anyOf"]
    assert [v["properties"]["name"]["const"] for v in variants] == ["get_weather", "search"]
    assert variants[0]["properties"]["arguments"] == TOOLS[0]["function"]["parameters"]
    assert all(
        v["required"] == ["name", "arguments"] and v["additionalProperties"] is False
        for v in variants
    )
    assert "maxItems" not in json.loads(tc.required_constraint(TOOLS, parallel=True).source)
    assert c.source == tc.required_constraint(TOOLS, parallel=False).source
    with pytest.raises(ValueError):
        tc.required_constraint([], parallel=True)


def test_required_constraint_moves_definitions_to_the_root() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/A"}},
                "$defs": {"A": {"type": "string"}},
            },
        },
    }
    schema = json.loads(tc.required_constraint([tool], parallel=True).source)
    assert schema["$defs"] == {"A": {"type": "string"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["arguments"]
    assert "$defs" in tool["function"]["parameters"]  # the caller's tool is left alone
    other = json.loads(json.dumps(tool))
    other["function"]["name"] = "g"
    other["function"]["parameters"]["$defs"]["A"] = {"type": "integer"}
    with pytest.raises(ValueError, match="differently"):
        tc.required_constraint([tool, other], parallel=True)


def test_named_call_parser_streams_at_once() -> None:
    parser = tc.NamedCallParser("get_weather")
    events = parser.feed("")
    assert (
        len(events) == 1 and isinstance(events[0], tc.CallStart) and events[0].name == "get_weather"
    )
    assert parser.feed(' {"city"') == [tc.CallArgs(0, '{"city"')]
    assert parser.feed(': "Oslo"}\n') == [tc.CallArgs(0, ': "Oslo"}')]
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"city": "Oslo"}'


@pytest.mark.parametrize("text", ['{"city": "Oslo", "x": [1, "]"]}', "{}"])
def test_named_call_parser_any_split(text: str) -> None:
    whole = run(lambda: tc.NamedCallParser("f"), [text])
    assert whole == ("", [("f", text)], False)
    for pieces in splits(text):
        assert run(lambda: tc.NamedCallParser("f"), pieces) == whole
    assert tc.parse(tc.NamedCallParser("f"), text)[1][0].arguments == text


def test_named_call_parser_malformed() -> None:
    assert tc.parse(tc.NamedCallParser("f"), '{"a": ') == ('{"a": ', [])
    assert tc.parse(tc.NamedCallParser("f"), "") == ("", [])


REQUIRED = (
    '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
    '{"arguments": {"q": "x"}, "name": "search"}]'
)


def test_required_calls_parser() -> None:
    parser = tc.RequiredCallsParser(TOOLS)
    assert parser.feed('[{"name": "get_wea') == []
    events = parser.feed('ther", "arguments": {"ci')
    assert [type(e) for e in events] == [tc.CallStart, tc.CallArgs]
    assert events[1] == tc.CallArgs(0, '{"ci')
    content, calls = tc.parse(tc.RequiredCallsParser(TOOLS), REQUIRED)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Oslo"}'),
        ("search", '{"q": "x"}'),
    ]


def test_required_calls_parser_any_split() -> None:
    whole = run(lambda: tc.RequiredCallsParser(TOOLS), [REQUIRED])
    assert not whole[2] and len(whole[1]) == 2
    for pieces in splits(REQUIRED):
        assert run(lambda: tc.RequiredCallsParser(TOOLS), pieces) == whole


# -- random splits -----------------------------------------------------------------------------

ALL_TEXTS = [(g[0], g[1]) for g in GOOD] + BAD


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(ALL_TEXTS),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_random_splits_match_whole(case: tuple[str, str], cuts: list[int]) -> None:
    family, text = case
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert run(lambda: tc.make_parser(family), pieces) == run(
        lambda: tc.make_parser(family), [text]
    )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet='<>{}[]"\\:,; \ntool_calTOLSARGpyhn|▁｜`json', max_size=80),
    family=st.sampled_from(sorted(tc.PARSERS)),
    cut=st.integers(min_value=0, max_value=80),
)
def test_arbitrary_text_is_never_lost(text: str, family: str, cut: int) -> None:
    # Any text: split or whole gives the same; without a call every character is content.
    whole = run(lambda: tc.make_parser(family), [text])
    assert run(lambda: tc.make_parser(family), [text[:cut], text[cut:]]) == whole
    content, calls, _ = whole
    if not calls:
        assert content == text
    parsed_content, parsed_calls = tc.parse(tc.make_parser(family), text)
    if not parsed_calls:
        assert parsed_content == text


# -- cost ----------------------------------------------------------------------------------------


def _big_output(size: int) -> str:
    call = (
        '<tool_call>\n{"name": "search", "arguments": {"q": "'
        + 'a\\"b ' * 10
        + '", "n": [1, {"x": 2}]}}\n</tool_call>\n'
    )
    prose = "Some words about the weather, with <b>tags</b> and [brackets]. " * 4
    long_arg = (
        '<tool_call>\n{"name": "f", "arguments": {"text": "'
        + "x" * (size // 4)
        + '"}}\n</tool_call>\n'
    )
    parts = [long_arg]
    while sum(map(len, parts)) < size:
        parts += [prose, call]
    return "".join(parts)


def _time(text: str, piece: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parser = tc.make_parser("hermes")
        for k in range(0, len(text), piece):
            parser.feed(text[k : k + piece])
        parser.finish()
        best = min(best, time.perf_counter() - start)
        assert not parser.malformed
    return best


def test_linear_time() -> None:
    small = _big_output(200_000)
    big = _big_output(800_000)
    t_small = _time(small, 4)
    assert t_small < 0.5
    assert _time(big, 4) < 8 * t_small
    assert _time(small, len(small)) < 0.5
