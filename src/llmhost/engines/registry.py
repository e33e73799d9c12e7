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
}


def available_engines() -> dict[str, str]:
    found = dict(BUILTIN_ENGINES)
    for ep in entry_points(group="llmhost.engines"):
        found.setdefault(ep.name, ep.value)
    return found


def create_engine(name: str, settings: Settings) -> Engine:
    """Instantiate engine `name` with the server settings; nothing is loaded until start()."""
    engines = available_engines()
    target = engines.get(name)
    if target is None:
        raise ConfigError(f"unknown engine {name!r}; available: {', '.join(sorted(engines))}")
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        extra = {"llamacpp": "llmhost[llamacpp]", "transformers": "llmhost[transformers]"}.get(
            name, f"the package providing {name}"
        )
        raise ConfigError(f"engine {name!r} needs {extra}: {exc}") from exc
    return factory.from_settings(settings)
