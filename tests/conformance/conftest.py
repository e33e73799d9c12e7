"""Every in-process chat engine, built the same way for the conformance suite, with what each
one legitimately lacks declared beside it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmhost.engines.base import Engine
from llmhost.engines.fake import FakeEngine
from llmhost.store.demo import BuiltModel
from tests.conftest import require


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "behaviour(name): the engine behaviour a conformance test checks"
    )


@dataclass(frozen=True)
class EngineKind:
    """How to build one engine from the tiny models, and the behaviours it lacks (name ->
    why). A test marked with a lacking behaviour is expected to fail on it (strict xfail), so
    the declaration is checked too: an engine that gains the behaviour fails until its
    declaration goes."""

    name: str
    build: Callable[..., Engine]
    lacks: Mapping[str, str] = field(default_factory=dict)
    # Behaviours it should have and does not yet (name -> the bug): expected to fail, though
    # a race may let them pass, so not strictly.
    bugs: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # optional modules

    def running(self, engine: Engine) -> int:
        """Streams the engine is generating for now."""
        stats = engine.health().stats
        return int(stats["running"] if "running" in stats else stats["active"])


def _llamacpp(models: BuiltModel, **limits: Any) -> Engine:
    from llmhost.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(models.gguf, threads=2, **limits)


def _transformers(models: BuiltModel, **limits: Any) -> Engine:
    from llmhost.engines.transformers import TransformersEngine

    return TransformersEngine(models.hf_dir, threads=2, **limits)


def _fake(models: BuiltModel, *, parallel: int, ctx_size: int, **_: Any) -> Engine:
    # Its EOS is scripted: built to end every stream that does not ignore EOS at once.
    return FakeEngine(context_length=ctx_size, max_sequences=parallel, eos_after=0)


KINDS = [
    EngineKind(
        "fake",
        _fake,
        lacks={
            "sampling": "its output is scripted: a seed or a temperature changes nothing",
            "queue": "it has no slots and no wait queue: every stream runs at once",
            "vocabulary": "it has no vocabulary: any token id reads as a word",
        },
    ),
    EngineKind("llamacpp", _llamacpp, needs=("llama_cpp",)),
    EngineKind(
        "transformers",
        _transformers,
        needs=("torch", "transformers"),
    ),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> EngineKind:
    """Each in-process chat engine in turn; a test marked `behaviour(name)` that the engine
    lacks is a strict xfail with the declared reason (one it has a known bug in, a lenient
    one)."""
    k: EngineKind = request.param
    for module in k.needs:
        require(module)
    for mark in request.node.iter_markers("behaviour"):
        why = k.lacks.get(mark.args[0])
        if why is not None:
            request.applymarker(
                pytest.mark.xfail(
                    reason=f"the {k.name} engine lacks {mark.args[0]}: {why}",
                    raises=(AssertionError, pytest.fail.Exception),
                    strict=True,
                )
            )
        bug = k.bugs.get(mark.args[0])
        if bug is not None:
            request.applymarker(
                pytest.mark.xfail(reason=f"{k.name} engine bug: {bug}", strict=False)
            )
    return k


@pytest.fixture
def make_engine(kind: EngineKind, tiny_model: BuiltModel, start_engine):
    """`await make_engine(parallel=.., ...)`: this kind's engine on the tiny model, started,
    and closed after the test."""

    async def make(
        *, parallel: int = 4, max_queue: int = 16, ctx_size: int = 256, batch_size: int = 512
    ) -> Engine:
        engine = kind.build(
            tiny_model,
            parallel=parallel,
            max_queue=max_queue,
            ctx_size=ctx_size,
            batch_size=batch_size,
        )
        return await start_engine(engine)

    return make
