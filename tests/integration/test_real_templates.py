"""Every chat template llama.cpp tests against renders byte for byte as transformers renders it."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from llmhost.engines import chat_template
from llmhost.engines.chat_template import (
    conversations_to_try,
    prepare_messages,
    render_chat,
    takes_content_parts,
)
from llmhost.errors import InvalidRequest
from tests.conftest import IN_CI, require
from tests.llama_sources import SourcesUnavailable, llama_cpp_sources, llama_cpp_templates

BOS, EOS = "<s>", "</s>"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name."},
                    "unit": {
                        "type": "string",
                        "description": "The temperature unit.",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["city"],
            },
        },
    }
]

# Variables some templates read besides the standard ones (firefunction-v2: `functions`, its
# tool list as JSON text, and `datetime`); passed to both renderers for every template.
EXTRA = {"functions": json.dumps(TOOLS, indent=2), "datetime": "2025-03-14 15:09"}

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the weather like in Zürich?"}

CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "user": ([USER], None),
    "system+user": ([SYSTEM, USER], None),
    "multi-turn": (
        [
            SYSTEM,
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi, how can I help?"},
            {"role": "user", "content": "Tell me a joke about 東京."},
        ],
        None,
    ),
    "tools": (
        [
            SYSTEM,
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "a1b2c3d4e",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Zürich", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "a1b2c3d4e",
                "name": "get_weather",
                "content": '{"temperature": 21, "sky": "sunny"}',
            },
        ],
        TOOLS,
    ),
    "content-parts": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarise this:"},
                    {"type": "text", "text": "Jinja is a templating engine."},
                ],
            }
        ],
        None,
    ),
}

FIXED_NOW = dt.datetime(2025, 3, 14, 15, 9, 26)


class _FixedClock(dt.datetime):
    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:
        return FIXED_NOW


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    try:
        src = llama_cpp_sources()
    except SourcesUnavailable as exc:
        if IN_CI:
            pytest.fail(f"the llama.cpp sources are required in CI: {exc}")
        pytest.skip(f"llama.cpp sources unavailable: {exc}")
    found = {path.stem: path.read_text(encoding="utf-8") for path in llama_cpp_templates(src)}
    assert found, f"no templates under {src}"
    return found


def _reference(source: str, messages: list[dict[str, Any]], tools: Any) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=source,
        add_generation_prompt=True,
        bos_token=BOS,
        eos_token=EOS,
        **EXTRA,
    )
    text = rendered[0]
    return text[len(BOS) :] if text.startswith(BOS) else text


def test_every_template_renders_as_transformers_does(templates, monkeypatch):
    require("transformers")
    from transformers.utils import chat_template_utils as hf

    # strftime_now in both environments reads one fixed clock, so dated headers compare equal.
    monkeypatch.setattr(hf, "datetime", _FixedClock)
    monkeypatch.setattr(chat_template, "datetime", _FixedClock)

    rendering: set[str] = set()
    equal = fallbacks = refused = 0
    failures: list[str] = []
    for name, source in templates.items():
        for label, (conversation, tools) in CONVERSATIONS.items():
            # The reference: transformers on the first of our fallback conversations it renders.
            expected = None
            parts = takes_content_parts(source)
            first = prepare_messages(conversation, content_parts=parts)
            for attempt in conversations_to_try(conversation, content_parts=parts):
                try:
                    expected = _reference(source, attempt, tools)
                except Exception:
                    continue
                fallbacks += attempt != first
                break
            try:
                ours = render_chat(
                    conversation,
                    source,
                    bos_token=BOS,
                    eos_token=EOS,
                    tools=tools,
                    extra_context=EXTRA,
                )
            except InvalidRequest as exc:
                if expected is not None:
                    failures.append(f"{name} / {label}: ours raised {exc}, transformers rendered")
                else:
                    refused += 1
                continue
            rendering.add(name)
            if expected is None:
                failures.append(f"{name} / {label}: transformers raised, ours rendered")
            elif ours != expected:
                failures.append(
                    f"{name} / {label}: differs\n  ours: {ours!r}\n  hf:   {expected!r}"
                )
            else:
                equal += 1
    summary = (
        f"{len(templates)} templates, {len(rendering)} render, {equal} renders equal, "
        f"{fallbacks} of them from a fallback conversation, {refused} refused by both"
    )
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures)
    assert len(rendering) == len(templates), sorted(set(templates) - rendering)
