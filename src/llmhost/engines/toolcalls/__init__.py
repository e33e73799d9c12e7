"""Tool calls in generated text: incremental parsers per model family that turn the text into
content and tool-call events, and the JSON-schema constraints that force a call."""

from llmhost.engines.toolcalls.events import CallArgs, CallStart, Content, Event, ToolCall
from llmhost.engines.toolcalls.families import (
    PARSERS,
    DeepSeekParser,
    HermesParser,
    JsonParser,
    Llama3Parser,
    MistralParser,
    detect,
    make_parser,
    parse,
)
from llmhost.engines.toolcalls.forced import (
    NamedCallParser,
    RequiredCallsParser,
    named_constraint,
    required_constraint,
)
from llmhost.engines.toolcalls.scanner import ToolCallParser

__all__ = [
    "PARSERS",
    "CallArgs",
    "CallStart",
    "Content",
    "DeepSeekParser",
    "Event",
    "HermesParser",
    "JsonParser",
    "Llama3Parser",
    "MistralParser",
    "NamedCallParser",
    "RequiredCallsParser",
    "ToolCall",
    "ToolCallParser",
    "detect",
    "make_parser",
    "named_constraint",
    "parse",
    "required_constraint",
]
