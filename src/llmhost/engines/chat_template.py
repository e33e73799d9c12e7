"""Chat templates (Jinja2, as shipped in GGUF metadata and tokenizer_config.json), rendered in a
sandbox so a hostile template cannot reach Python internals."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmhost.errors import InvalidRequest

# ChatML: understood by most instruction-tuned models when a model ships no template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template rejected the conversation: {message}", param="messages")


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`. A leading BOS written by the template is removed: the
    engine adds BOS itself when the model asks for one, and two BOS tokens degrade output."""
    try:
        text = _compile(template or FALLBACK_TEMPLATE).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except InvalidRequest:
        raise
    except TemplateError as exc:
        raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token) :]
    return text
