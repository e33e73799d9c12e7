"""The models one `llmhost serve` serves: named on the command line, declared as
`[models.<id>]` tables in config.toml, or every model in the store; each becomes the engine
settings it is served with and a pool spec carrying the memory `llmhost plan` says it needs."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import psutil

from llmhost.config import ModelEntry, Settings
from llmhost.engines.pool import ModelSpec, Pool, keep_alive_seconds
from llmhost.engines.registry import create_engine, engine_class
from llmhost.errors import ConfigError
from llmhost.observability.gpu import Nvml
from llmhost.ops.plan import GPU_SHARE, RAM_RESERVE, host_bytes, shape_from_model
from llmhost.store.registry import ModelStore

log = logging.getLogger("llmhost.serve")
REMOTE_ENGINES = frozenset({"openai"})  # the model is a name on another server
# Engine settings a [models.<id>] table may set for its model
OVERRIDES = (
    "ctx_size",
    "parallel",
    "threads",
    "batch_size",
    "dtype",
    "device",
    "quantization",
    "upstream_url",
    "tool_parser",
)


def resolve_source(settings: Settings, ref: str, engine: str) -> tuple[str, str]:
    """The path (or remote name) a model reference stands for, and the id clients send."""
    path = Path(ref).expanduser()
    if engine in REMOTE_ENGINES or path.exists():
        return str(path) if path.exists() else ref, path.name.removesuffix(".gguf") or ref
    try:
        found = ModelStore(settings.models_dir).resolve(ref)
    except LookupError as exc:
        raise ConfigError(f"model not found: {ref} ({exc})") from exc
    return str(found), ref.replace("@", ":")


def duration(value: float | str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return keep_alive_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def entries(settings: Settings, refs: list[str], all_models: bool) -> dict[str, ModelEntry]:
    """The models to serve, in order (the first is the default): the config's tables, then
    the command line's references, then (with `all_models`) the rest of the store."""
    found: dict[str, ModelEntry] = dict(settings.models)
    for ref in refs:
        _, model_id = resolve_source(settings, ref, settings.engine)
        found.setdefault(model_id, ModelEntry(source=ref))
    if all_models:
        for m in ModelStore(settings.models_dir).list():
            ref = f"{m.name}:{m.tag}"
            if ref not in found and not any(e.source == ref for e in found.values()):
                found[ref] = ModelEntry(source=ref)
    if not found:
        raise ConfigError("no model to serve: name one, declare [models.<id>] or --all-models")
    return found


def model_settings(settings: Settings, model_id: str, entry: ModelEntry) -> Settings:
    """The settings this model's engine is built from: the server's, with its own source,
    engine, id and overrides."""
    engine = entry.engine or settings.engine
    source, _ = resolve_source(settings, entry.source, engine)
    update: dict[str, Any] = {"model": source, "model_name": model_id, "engine": engine}
    for name in OVERRIDES:
        value = getattr(entry, name)
        if value is not None:
            update[name] = value
    return settings.model_copy(update=update)


def memory_need(s: Settings, gpus: dict[int, int]) -> tuple[int, dict[int, int]]:
    """What the model of `s` holds once loaded, as `llmhost plan` estimates it (weights + KV
    cache): bytes of host memory, and bytes on each GPU it is placed on. `gpus` is each GPU's
    memory. Unknown (a remote engine, a shape that cannot be read) counts as nothing."""
    if s.engine in REMOTE_ENGINES or s.engine == "fake" or not s.model:
        return 0, {}
    if s.engine == "vllm":  # vLLM takes its share of each GPU it spans, whatever the model
        share = {
            i: int(gpus.get(i, 0) * s.gpu_memory_utilization) for i in range(s.tensor_parallel)
        }
        return 0, {i: n for i, n in share.items() if n}
    try:
        shape, quant, _ = shape_from_model(s.model, s.models_dir)
    except ConfigError as exc:
        log.warning("no memory estimate for %s: %s", s.model_name, exc.message)
        return 0, {}
    need = host_bytes(shape, quant or "fp16", s.ctx_size or None, s.parallel)
    gpu = placed_on(s, gpus)
    return (0, {gpu: need}) if gpu is not None else (need, {})


def placed_on(s: Settings, gpus: dict[int, int]) -> int | None:
    """The GPU the engine of `s` puts its model on, or None for host memory (llama.cpp here
    computes on the CPU; transformers follows its `device`, `auto` taking GPU 0 if any)."""
    if s.engine != "transformers":
        return None
    device = (s.device or "auto").lower()
    if device == "auto":
        return 0 if gpus else None
    if device == "cuda":
        return 0
    index = device.removeprefix("cuda:")
    return int(index) if device.startswith("cuda:") and index.isdigit() else None


def default_budget() -> int:
    """The host's RAM less the deployment guide's 20% reserve."""
    return int(psutil.virtual_memory().total * (1 - RAM_RESERVE))


def gpu_memory() -> dict[int, int]:
    """Each NVIDIA GPU's memory in bytes, by index (none without a driver)."""
    return {g.index: g.memory_total for g in Nvml().readings() if g.memory_total}


Served = list[tuple[str, ModelEntry, Settings]]


def served(settings: Settings, refs: list[str], all_models: bool = False) -> Served:
    """Each model to serve: its id, its entry and the settings its engine is built from."""
    return [
        (model_id, entry, model_settings(settings, model_id, entry))
        for model_id, entry in entries(settings, refs, all_models).items()
    ]


def build_pool(settings: Settings, models: Served) -> Pool:
    """The pool of `models` (from `served`), nothing loaded yet."""
    default_keep = duration(settings.keep_alive, "keep_alive")
    gpus = gpu_memory()
    specs = []
    for model_id, entry, s in models:
        engine_class(s.engine, entry.kind)  # imported now: a missing extra fails at start
        keep = duration(entry.keep_alive, f"models.{model_id}.keep_alive")
        host, on_gpus = memory_need(s, gpus)
        specs.append(
            ModelSpec(
                id=model_id,
                build=functools.partial(create_engine, s.engine, s, entry.kind),
                kind=entry.kind,
                need_bytes=host,
                gpu_bytes=on_gpus,
                keep_alive=keep if entry.keep_alive is not None else default_keep,
                pinned=entry.pinned,
                rpm=entry.rate_limit_rpm,
                quota=(
                    entry.quota_tokens_per_day,
                    entry.quota_tokens_per_month,
                    entry.quota_requests_per_day,
                ),
            )
        )
    budget = settings.memory_budget_mb << 20 if settings.memory_budget_mb else default_budget()
    per_gpu = settings.gpu_memory_budget_mb
    gpu_budget = {i: per_gpu << 20 if per_gpu else int(n * GPU_SHARE) for i, n in gpus.items()}
    return Pool(
        specs,
        budget_bytes=budget,
        gpu_budget=gpu_budget,
        load_timeout=settings.model_load_timeout,
    )
