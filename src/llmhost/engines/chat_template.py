"""Chat templates (Jinja2, as shipped in GGUF metadata and tokenizer_config.json), rendered as
transformers' `apply_chat_template` renders them, in a sandbox a hostile template cannot leave."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from llmhost.chatml import FALLBACK_TEMPLATE
from llmhost.errors import InvalidRequest

# Names render_chat sets itself; a template kwarg may not replace them.
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

# The names a message's reasoning arrives under; templates read the first (transformers does the
# same aliasing in render_jinja_template, and gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Rejected(TemplateError):
    """The template called raise_exception: it refuses this conversation."""


def _raise_exception(message: str) -> None:
    raise _Rejected(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML and takes no separators; templates are
    # written against transformers' version, which is plain json.dumps without ASCII escaping.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """Jinja's namespace() refusing underscore names, as transformers' does: a stored `__class__`
    or `_attrs` is a step towards Python internals."""

    # No named self, as in Namespace: `namespace(self=...)` must still work.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store {name!r} on a namespace")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks in
    transformers; serving needs no mask, so the body renders unchanged. It is a call block, as in
    transformers, so a `set` inside it stays inside it there and here."""

    tags = {"generation"}  # noqa: RUF012 - Jinja reads this class attribute

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Compiled:
    """A compiled template and whether it loops over a message's content parts."""

    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        self.template = env.from_string(source)
        self.iterates_content = _iterates_content(env.parse(source))


@lru_cache(maxsize=16)
def _compile(source: str) -> _Compiled:
    try:
        return _Compiled(source)
    except TemplateError as exc:
        raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc


# --- content-part detection (vLLM's `_detect_content_format`, entrypoints/chat_utils.py) -------


def _unwrap(node: nodes.Node) -> nodes.Node:
    """The expression under filters, tests and slices: `message['content'] | selectattr(...)`
    and `message.content[1:]` still iterate the content."""
    while True:
        inner: nodes.Node | None = None
        if isinstance(node, (nodes.Filter, nodes.Test)) or (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
        ):
            inner = node.node
        if inner is None:
            return node
        node = inner


def _is_name(node: nodes.Node, names: set[str]) -> bool:
    node = _unwrap(node)
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names


def _is_content_of(node: nodes.Node, names: set[str]) -> bool:
    node = _unwrap(node)
    if isinstance(node, nodes.Getattr):
        return node.attr == "content" and _is_name(node.node, names)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return node.arg.value == "content" and _is_name(node.node, names)
    return False


def _loop_targets(root: nodes.Template, names: set[str]) -> Iterator[str]:
    for loop in root.find_all(nodes.For):
        if _is_name(loop.iter, names) and isinstance(loop.target, nodes.Name):
            yield loop.target.name


def _iterates_content(root: nodes.Template) -> bool:
    """Whether the template loops over `message.content` for some message of `messages`, or of
    a variable set from it (`{% set loop_messages = messages[1:] %}`). Such a template takes
    content as a list of parts; any other reads content as one string."""
    conversations = {"messages"}
    grew = True
    while grew:
        grew = False
        for assign in root.find_all(nodes.Assign):
            target = assign.target
            if (
                isinstance(target, nodes.Name)
                and target.name not in conversations
                and _is_name(assign.node, conversations)
            ):
                conversations.add(target.name)
                grew = True
    messages = set(_loop_targets(root, conversations))
    return any(_is_content_of(loop.iter, messages) for loop in root.find_all(nodes.For))


def takes_content_parts(template: str | None) -> bool:
    """Whether `template` loops over a message's content parts, so `prepare_messages` passes
    lists of parts to it instead of joining them."""
    return _compile(template or FALLBACK_TEMPLATE).iterates_content


# --- message preparation ----------------------------------------------------------------------


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text"


def _join_text_parts(parts: list[Any]) -> str:
    return "\n".join(str(part.get("text") or "") for part in parts)


def _prepare_content(content: Any, as_parts: bool) -> Any:
    if content is None:
        return ""
    if isinstance(content, (list, tuple)):
        parts = [dict(p) if isinstance(p, Mapping) else p for p in content]
        if not as_parts and all(_is_text_part(p) for p in parts):
            return _join_text_parts(parts)
        return parts
    return content


def _parse_arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _prepare_tool_calls(tool_calls: list[Any], parse_arguments: bool) -> list[Any]:
    prepared = []
    for call in tool_calls:
        if not isinstance(call, Mapping):
            prepared.append(call)
            continue
        call = dict(call)
        function = call.get("function")
        if isinstance(function, Mapping):
            function = dict(function)
            if parse_arguments and "arguments" in function:
                function["arguments"] = _parse_arguments(function["arguments"])
            call["function"] = function
        prepared.append(call)
    return prepared


def prepare_messages(
    messages: list[Mapping[str, Any]],
    *,
    content_parts: bool = False,
    parse_arguments: bool = True,
) -> list[dict[str, Any]]:
    """OpenAI-format messages made ready for a chat template, as vLLM and llama-server do before
    rendering. New dicts are returned; the caller's are left as they were.

    1. Keys whose value is None are dropped (transformers' `_normalize_chat_messages`): templates
       test for a missing key and would print "None". Content None or missing becomes "", as in
       vLLM's message parsing and llama.cpp's `requires_non_null_content`, since templates
       concatenate an assistant tool-call turn's content.
    2. Content: a list of only text parts is joined with "\\n" into one string, unless
       `content_parts` says the template loops over `message.content`, when the list is passed
       as it is. vLLM's "string" content format (`"\\n".join(texts)`) and llama.cpp's
       `concat_content_parts` join with that separator; vLLM's "openai" format and llama.cpp's
       templates that take both forms pass the list. A string stays a string for every template:
       vLLM would wrap it in a text part for a parts template, but Gemma 4's renders a system
       turn's list as its Python repr, and all 16 parts templates among the 70 llama.cpp tests
       against (models/templates) read strings too. A list holding other parts (images, audio)
       is passed as it is.
    3. An assistant turn's `tool_calls[].function.arguments` given as a JSON string is parsed
       when it holds a JSON object: templates write `arguments | tojson` or loop over its items
       (vLLM's `_postprocess_messages`, llama.cpp's `func_args_not_string`). An empty string
       becomes {} as in vLLM; anything else stays the string it was. `parse_arguments=False`
       leaves every string as it is, for templates that print the arguments as text (see
       `conversations_to_try`). An empty `tool_calls` list is dropped, as vLLM does, so the turn
       takes the template's plain-assistant path.
    4. Reasoning given as `reasoning_content`, `thinking` or `reasoning` is copied to
       `reasoning_content` and `thinking`, as transformers' render_jinja_template does.
    """
    prepared = []
    for message in messages:
        out = {key: value for key, value in message.items() if value is not None}
        out["content"] = _prepare_content(out.get("content"), content_parts)
        tool_calls = out.get("tool_calls")
        if isinstance(tool_calls, (list, tuple)):
            if tool_calls:
                out["tool_calls"] = _prepare_tool_calls(list(tool_calls), parse_arguments)
            else:
                del out["tool_calls"]
        reasoning = next((out[key] for key in _REASONING_FIELDS if key in out), None)
        if reasoning is not None:
            out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
        prepared.append(out)
    return prepared


def merge_system_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with a leading system turn folded into the next turn, for templates that
    refuse a system role: llama.cpp's `system_message_not_supported` (common/chat.cpp) writes
    `system + "\\n" + next` into the next message's content and drops the system message, or just
    drops it when it is alone. With content parts the system text becomes the first part."""
    if not messages or messages[0].get("role") != "system":
        return messages
    if len(messages) == 1:
        return []
    system, following = messages[0], dict(messages[1])
    system_content = system.get("content", "")
    system_text = (
        _join_text_parts([p for p in system_content if _is_text_part(p)])
        if isinstance(system_content, list)
        else str(system_content)
    )
    content = following.get("content", "")
    if isinstance(content, list):
        following["content"] = [{"type": "text", "text": system_text}, *content]
    else:
        following["content"] = system_text + "\n" + str(content)
    return [following, *messages[2:]]


def conversations_to_try(
    messages: list[Mapping[str, Any]], *, content_parts: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """The prepared conversations `render_chat` tries in turn until the template renders one:
    1. `prepare_messages(messages)`;
    2. with tool-call arguments left as JSON text, if any were parsed: llama.cpp parses them
       only for templates that read them as objects (caps.cpp `supports_object_arguments`),
       and some (functionary v3.2) concatenate them as strings;
    3. when the conversation opens with a system turn, each of those with it merged into the
       next turn (`merge_system_turn`), as llama.cpp does for templates without a system role.
    """
    first = prepare_messages(messages, content_parts=content_parts)
    tried = [first]
    yield first
    unparsed = prepare_messages(messages, content_parts=content_parts, parse_arguments=False)
    if unparsed != first:
        tried.append(unparsed)
        yield unparsed
    if first and first[0].get("role") == "system":
        for conversation in tried:
            yield merge_system_turn(conversation)


# --- rendering ----------------------------------------------------------------------------------


def _render(compiled: _Compiled, messages: list[dict[str, Any]], context: dict[str, Any]) -> str:
    try:
        return compiled.template.render(messages=messages, **context)
    except _Rejected as exc:
        raise InvalidRequest(
            f"chat template rejected the conversation: {exc}", param="messages"
        ) from exc
    except InvalidRequest:
        raise
    except (
        TemplateError,
        TypeError,
        ValueError,
        LookupError,
        AttributeError,
        ArithmeticError,
        RecursionError,
    ) as exc:
        # Template bugs surface as Python errors too ('str' + None, 1 / 0); either way
        # the conversation cannot be rendered, which is the client's to fix or know about.
        raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc


def render_chat(
    messages: list[Mapping[str, Any]],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    extra_context: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for `messages`, as transformers' apply_chat_template renders it: the same
    variables (messages, tools, documents, add_generation_prompt, the special tokens and any
    `extra_context` such as `enable_thinking`), the same Jinja environment and filters.

    Messages go through `prepare_messages` first. When the template raises, the fallbacks of
    `conversations_to_try` are rendered in turn (tool-call arguments as text, the system turn
    merged into the next, as llama.cpp does); if all fail, the first error is reported.

    A leading BOS written by the template is removed: the engine adds BOS itself when the model
    asks for one, and two BOS tokens degrade output."""
    compiled = _compile(template or FALLBACK_TEMPLATE)
    if extra_context and (clash := _RESERVED.intersection(extra_context)):
        raise InvalidRequest(
            f"chat template arguments cannot set {', '.join(sorted(clash))}",
            param="chat_template_kwargs",
        )
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise InvalidRequest("documents must be objects", param="documents")
    context = {
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        **(extra_context or {}),
    }
    errors: list[InvalidRequest] = []
    for conversation in conversations_to_try(messages, content_parts=compiled.iterates_content):
        try:
            text = _render(compiled, conversation, context)
            break
        except InvalidRequest as exc:
            errors.append(exc)
    else:
        raise errors[0]
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token) :]
    return text
