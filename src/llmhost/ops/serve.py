"""`llmhost serve` below the command line: the settings a serve command stands for (the demo
model, a stored model, a saved plan) and the checks made on its models before anything
listens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from llmhost.config import ModelEntry, Settings
from llmhost.errors import ConfigError
from llmhost.ops.serve_models import REMOTE_ENGINES, Served, served

if TYPE_CHECKING:
    from llmhost.store.loadcheck import LoadCheck

# --demo lets pages served from this machine call it, e.g. a front end under development.
DEMO_CORS_ORIGINS = ["http://localhost:*", "http://127.0.0.1:*"]
DEMO_ID = "llmhost-demo"


def plan_settings(path: Path, gpu: str | None, settings: Settings) -> dict:
    """Tensor-parallel degree (and context) from a saved `llmhost plan --json`."""
    try:
        plan = json.loads(path.read_text())
        rows = plan["gpus"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not the JSON of `llmhost plan --json` ({exc})") from exc
    if gpu is None:
        raise ConfigError("--from-plan needs --plan-gpu NAME (a row of the plan)")
    match = [r for r in rows if gpu.lower() in str(r.get("gpu", "")).lower()]
    if len(match) != 1:
        raise ConfigError(f"--plan-gpu {gpu!r} matches {len(match)} rows of the plan")
    need = match[0].get("gpus_needed")
    if not need:
        raise ConfigError(f"the plan says the model does not fit on {match[0]['gpu']}")
    return {"tensor_parallel": int(need), "ctx_size": settings.ctx_size or int(plan["ctx"])}


def with_demo_model(settings: Settings) -> Settings:
    """The settings with the built-in demo model (built on first use) as their model, and
    pages from this machine allowed to call it unless CORS was configured."""
    from llmhost.store.demo import ensure_demo_model

    path = ensure_demo_model(settings.models_dir)
    update: dict = {"model": str(path), "model_name": settings.model_name or DEMO_ID}
    if "cors_origins" not in settings.model_fields_set:  # not set by flag, env or file
        update["cors_origins"] = DEMO_CORS_ORIGINS
    return settings.model_copy(update=update)


def with_stored_model(settings: Settings) -> Settings:
    """A model named as name:tag or name@channel becomes its folder in the store (and the id
    clients send); a path that exists, a remote engine's model or none is left as it is."""
    if (
        not settings.model
        or settings.engine in REMOTE_ENGINES
        or Path(settings.model).expanduser().exists()
    ):
        return settings
    from llmhost.store.registry import ModelStore

    try:
        found = ModelStore(settings.models_dir).resolve(settings.model)
    except LookupError as exc:
        if settings.engine == "vllm":  # a Hugging Face id: vLLM fetches it itself
            return settings
        raise ConfigError(f"model not found: {settings.model} ({exc})") from exc
    name = settings.model_name or settings.model.replace("@", ":")
    return settings.model_copy(update={"model": str(found), "model_name": name})


def several(settings: Settings, refs: list[str], all_models: bool, demo: bool) -> Served:
    """Every model to serve: those named, declared in config.toml or stored (`all_models`);
    with `demo` the demo model (already the settings' model) first, pinned."""
    if demo:
        entry = ModelEntry(source=str(settings.model), pinned=True)
        settings = settings.model_copy(
            update={"models": {DEMO_ID: entry, **settings.models}, "model": None}
        )
    return served(settings, refs, all_models)


def check_model_files(settings: Settings) -> LoadCheck | None:
    """Before anything listens: a model from the store must match its manifest (IntegrityError,
    exit 1), and an encrypted one needs a decrypt folder in memory (ConfigError, exit 2). The
    check made, whose `unhashed` files were not hashed, or None for a model not stored here."""
    if not settings.model or settings.engine in REMOTE_ENGINES:
        return None
    from llmhost.store.in_memory import check_decrypt_dir, is_sealed
    from llmhost.store.loadcheck import check_before_load

    path = Path(settings.model).expanduser()
    if is_sealed(path):
        check_decrypt_dir(settings.decrypt_dir, allow_disk=settings.decrypt_allow_disk)
    return check_before_load(
        path,
        mode=settings.verify_on_load,
        hash_max_bytes=settings.verify_hash_max_mb << 20,
    )
