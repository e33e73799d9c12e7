"""Engine names to factories. Built-in engines register exactly as an outside plugin would
(entry point group `llmhost.engines`, value `module:Class`), and are imported only when chosen."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from llmhost.errors import ConfigError

if TYPE_CHECKING:
    from llmhost.config import Settings
    from llmhost.engines.base import Engine

BUILTIN_ENGINES: dict[str, str] = {
    "llamacpp": "llmhost.engines.llamacpp:LlamaCppEngine",
    "transformers": "llmhost.engines.transformers:TransformersEngine",
    "fake": "llmhost.engines.fake:FakeEngine",
    "openai": "llmhost.engines.openai_upstream:OpenAIUpstreamEngine",
    "vllm": "llmhost.engines.vllm:VllmEngine",
    # Engines of another kind than chat: "<engine>:<kind>"
    "llamacpp:embedding": "llmhost.engines.llamacpp_embed:LlamaCppEmbeddingEngine",
    "transformers:embedding": "llmhost.engines.transformers_embed:TransformersEmbeddingEngine",
    "llamacpp:rerank": "llmhost.engines.llamacpp_embed:LlamaCppRerankEngine",
    "transformers:rerank": "llmhost.engines.transformers_embed:TransformersRerankEngine",
}


def available_engines() -> dict[str, str]:
    found = dict(BUILTIN_ENGINES)
    for ep in entry_points(group="llmhost.engines"):
        found.setdefault(ep.name, ep.value)
    return found


def engine_class(name: str, kind: str = "chat") -> type[Engine]:
    """The class of engine `name` serving `kind`, its module imported (a server imports its
    engines at start, so the first request for a model does not pay for the import)."""
    engines = available_engines()
    target = engines.get(name if kind == "chat" else f"{name}:{kind}")
    if target is None and kind != "chat" and name in engines:
        kinds = sorted(k.partition(":")[2] for k in engines if k.startswith(name + ":"))
        raise ConfigError(
            f"the {name} engine serves no {kind} models; it serves chat"
            + "".join(f", {k}" for k in kinds)
        )
    if target is None:
        names = sorted(k for k in engines if ":" not in k)
        raise ConfigError(f"unknown engine {name!r}; available: {', '.join(names)}")
    module_name, _, attr = target.partition(":")
    try:
        cls: type[Engine] = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        extra = {"llamacpp": "llmhost[llamacpp]", "transformers": "llmhost[transformers]"}.get(
            name, f"the package providing {name}"
        )
        raise ConfigError(f"engine {name!r} needs {extra}: {exc}") from exc
    return cls


def create_engine(name: str, settings: Settings, kind: str = "chat") -> Engine:
    """Instantiate engine `name` (serving `kind`) with the server settings; nothing is
    loaded until start()."""
    return engine_class(name, kind).from_settings(settings)
