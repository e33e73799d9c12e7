"""Chat template rendering: transformers' Jinja environment, message preparation, fallbacks."""

from __future__ import annotations

import copy
import datetime as dt

import pytest

from llmhost.engines import chat_template
from llmhost.engines.chat_template import (
    conversations_to_try,
    merge_system_turn,
    prepare_messages,
    render_chat,
    takes_content_parts,
)
from llmhost.errors import InvalidRequest

USER = [{"role": "user", "content": "hi"}]
EACH = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"


def test_loop_controls():
    tpl = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.content }};{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    )
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": "user", "content": str(i)} for i in range(5)
    ]
    assert render_chat(msgs, tpl) == "0;1;"


def test_generation_tag_renders_its_body():
    tpl = (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% generation %}<a>{{ m.content }}</a>{% endgeneration %}"
        "{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}"
    )
    msgs = [*USER, {"role": "assistant", "content": "yo"}]
    assert render_chat(msgs, tpl) == "<u>hi</u><a>yo</a>"


def test_tojson_is_transformers_json_dumps():
    tpl = (
        "{{ messages[0].content | tojson }}|{{ tools | tojson(indent=2) }}|"
        "{{ tools[0] | tojson(separators=(',', ':'), sort_keys=true) }}"
    )
    tools = [{"b": "<&'>", "a": "東京"}]
    text = render_chat([{"role": "user", "content": "Zürich <b>"}], tpl, tools=tools)
    assert text == (
        '"Zürich <b>"|[\n  {\n    "b": "<&\'>",\n    "a": "東京"\n  }\n]|{"a":"東京","b":"<&\'>"}'
    )


def test_raise_exception_is_a_400_on_messages():
    tpl = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(InvalidRequest, match="roles must alternate") as err:
        render_chat(USER, tpl)
    assert err.value.param == "messages"


def test_template_bugs_are_a_400_not_a_crash():
    bugs = (
        "{{ messages[0].content + none }}",
        "{{ undefined_thing.attr }}",
        "{{ 1 / 0 }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% for %}",
    )
    for tpl in bugs:
        with pytest.raises(InvalidRequest):
            render_chat(USER, tpl)


def test_strftime_now_reads_the_clock(monkeypatch):
    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2024, 7, 23, 9, 5)

    monkeypatch.setattr(chat_template, "datetime", Clock)
    assert render_chat(USER, "{{ strftime_now('%d %b %Y') }}") == "23 Jul 2024"


def test_tools_documents_and_extra_context_are_passed():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    tpl = (
        "{% for t in tools %}{{ t.function.name }}:{{ t.function.description }}{% endfor %}|"
        "{% for d in documents %}{{ d.title }}={{ d.text }}{% endfor %}|"
        "{{ enable_thinking }}|{{ add_generation_prompt }}|{{ bos_token }}{{ eos_token }}"
    )
    text = render_chat(
        USER,
        tpl,
        tools=tools,
        documents=[{"title": "t", "text": "x"}],
        extra_context={"enable_thinking": False},
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=False,
    )
    assert text == "f:d|t=x|False|False|<s></s>"
    assert render_chat(USER, "{{ tools is none }}{{ documents is none }}") == "TrueTrue"


def test_extra_context_cannot_replace_the_conversation():
    with pytest.raises(InvalidRequest) as err:
        render_chat(USER, EACH, extra_context={"messages": []})
    assert err.value.param == "chat_template_kwargs"


def test_whole_messages_reach_the_template():
    msgs = [
        {"role": "user", "content": "weather?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"city": "Zürich", "n": [1, 2]}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
    ]
    tpl = (
        "{% for m in messages %}"
        "{% if m.name is defined %}{{ m.name }}:{% endif %}[{{ m.content }}]"
        "{% for c in m.tool_calls or [] %}{{ c.id }} {{ c.function.name }}"
        "{% for k, v in c.function.arguments | items %} {{ k }}={{ v | tojson }}{% endfor %}"
        "{% endfor %}{% if m.tool_call_id is defined %}<{{ m.tool_call_id }}>{% endif %};"
        "{% endfor %}"
    )
    before = copy.deepcopy(msgs)
    text = render_chat(msgs, tpl)
    assert text == 'ann:[weather?];[]call_1 get city="Zürich" n=[1, 2];[21C]<call_1>;'
    assert msgs == before  # the caller's dicts are untouched


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ({"a": 1}, {"a": 1}),
        ("", {}),
        ("  ", {}),
        ("[1, 2]", "[1, 2]"),
        ('{"a": ', '{"a": '),
        ("42", "42"),
    ],
)
def test_tool_call_arguments_become_objects_when_they_are_one(given, expected):
    msgs = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": given}}]}]
    (out,) = prepare_messages(msgs)
    assert out["tool_calls"][0]["function"]["arguments"] == expected
    assert out["content"] == ""
    (raw,) = prepare_messages(msgs, parse_arguments=False)
    assert raw["tool_calls"][0]["function"]["arguments"] == given


def test_none_fields_and_empty_tool_calls_are_dropped():
    (out,) = prepare_messages(
        [{"role": "assistant", "content": "x", "name": None, "tool_calls": []}]
    )
    assert out == {"role": "assistant", "content": "x"}


def test_reasoning_is_aliased_as_transformers_does():
    (out,) = prepare_messages([{"role": "assistant", "content": "a", "reasoning": "because"}])
    assert out["reasoning_content"] == out["thinking"] == out["reasoning"] == "because"


TEXT_PARTS = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
PARTS_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}({{ part.type }}:{{ part.text }})"
    "{% endfor %}{% endif %}{% endfor %}"
)


def test_text_parts_are_joined_for_a_string_template():
    assert not takes_content_parts(EACH)
    assert render_chat([{"role": "user", "content": TEXT_PARTS}], EACH) == "[user]one\ntwo"


def test_parts_are_passed_to_a_template_that_loops_over_them():
    assert takes_content_parts(PARTS_TEMPLATE)
    msgs = [{"role": "user", "content": TEXT_PARTS}, {"role": "assistant", "content": "ok"}]
    assert render_chat(msgs, PARTS_TEMPLATE) == "(text:one)(text:two)ok"


def test_content_part_detection_follows_the_messages():
    assert takes_content_parts(
        "{% for m in messages[1:] %}{% for p in m.content | selectattr('type') %}{% endfor %}"
        "{% endfor %}"
    )
    assert not takes_content_parts(
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% for t in tools %}{% for p in t.content %}{% endfor %}{% endfor %}"
    )
    assert not takes_content_parts(None)


def test_other_parts_are_left_for_the_template():
    parts = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]
    (out,) = prepare_messages([{"role": "user", "content": parts}])
    assert out["content"] == parts


NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}{% endfor %}"
)


def test_system_turn_is_merged_when_the_template_refuses_it():
    msgs = [{"role": "system", "content": "Be brief."}, *USER]
    assert render_chat(msgs, NO_SYSTEM) == "<user>Be brief.\nhi"
    assert render_chat(msgs[:1], NO_SYSTEM) == ""


def test_merge_with_parts_puts_the_system_text_first():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": TEXT_PARTS}]
    merged = merge_system_turn(msgs)
    assert merged == [{"role": "user", "content": [{"type": "text", "text": "S"}, *TEXT_PARTS]}]
    assert merge_system_turn(USER) == USER


def test_no_merge_without_a_leading_system_turn():
    with pytest.raises(InvalidRequest, match="System role not supported"):
        render_chat([*USER, {"role": "system", "content": "late"}], NO_SYSTEM)


def test_first_error_is_reported_when_every_fallback_fails():
    tpl = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ raise_exception('other') }}"
    )
    with pytest.raises(InvalidRequest, match="no system"):
        render_chat([{"role": "system", "content": "s"}, *USER], tpl)


def test_arguments_stay_text_for_a_template_that_concatenates_them():
    tpl = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name + ' ' + c.function.arguments }}{% endfor %}{% endfor %}"
    )
    msgs = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    assert render_chat(msgs, tpl) == "f {}"
    tried = list(conversations_to_try([{"role": "system", "content": "s"}, *msgs]))
    assert len(tried) == 4  # parsed, text, and each with the system turn merged


def test_template_bos_is_stripped_once():
    tpl = "{{ bos_token }}{{ bos_token }}" + EACH
    assert render_chat(USER, tpl, bos_token="<s>") == "<s>[user]hi"


def test_fallback_template_without_one():
    assert render_chat(USER, None) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "tpl",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ raise_exception.__globals__['json'] }}",
        "{{ dict.__call__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace(_secret=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ '{0.__class__.__mro__}'.format('') }}",
    ],
)
def test_hostile_templates_are_refused(tpl):
    with pytest.raises(InvalidRequest):
        render_chat(USER, tpl)


def test_unsafe_attributes_render_as_nothing():
    # The sandbox answers a dunder lookup with an undefined value: nothing leaks.
    tpl = "{{ ''.__class__ }}|{{ messages.__len__ }}|{{ raise_exception.__globals__ }}"
    assert render_chat(USER, tpl) == "||"


def test_dict_and_namespace_work_as_in_transformers():
    tpl = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['x']) | tojson }}"
    )
    assert render_chat(USER, tpl) == '1{"a": 1}{"x": null}'
