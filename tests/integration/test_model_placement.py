"""Where each served model's memory counts: llama.cpp on the host, transformers on the GPU its
`device` names (GPU 0 for `auto` when there is one), vLLM its share of every GPU it spans; and
the pool's budgets, host and per GPU, built from the settings and the GPUs found."""

from __future__ import annotations

from llmhost.config import ModelEntry, Settings
from llmhost.ops import serve_models
from llmhost.ops.serve_models import build_pool, memory_need, served

GIB = 1 << 30


def test_each_engine_counts_its_memory_where_it_puts_the_model(tiny_model):
    gguf, hf = str(tiny_model.gguf), str(tiny_model.hf_dir)
    host, gpus = memory_need(Settings(model=gguf, engine="llamacpp"), {0: 80 * GIB})
    assert host > 0 and gpus == {}  # llama.cpp computes on the CPU here, GPU or not
    size = memory_need(Settings(model=hf, engine="transformers", device="cpu"), {})[0]
    assert size > 0
    for device, found, expect in [
        ("auto", {}, (size, {})),
        ("auto", {0: 80 * GIB}, (0, {0: size})),
        ("cuda", {0: 80 * GIB}, (0, {0: size})),
        ("cuda:1", {0: 80 * GIB, 1: 80 * GIB}, (0, {1: size})),
        ("cpu", {0: 80 * GIB}, (size, {})),
    ]:
        s = Settings(model=hf, engine="transformers", device=device)
        assert memory_need(s, found) == expect, device
    vllm = Settings(model=hf, engine="vllm", tensor_parallel=2, gpu_memory_utilization=0.5)
    assert memory_need(vllm, {0: 80 * GIB, 1: 40 * GIB}) == (0, {0: 40 * GIB, 1: 20 * GIB})
    remote = Settings(model="gpt-x", engine="openai", upstream_url="http://127.0.0.1:9/v1")
    assert memory_need(remote, {0: 80 * GIB}) == (0, {})


def test_budgets_per_gpu_from_the_cards_found_or_the_settings(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(serve_models, "gpu_memory", lambda: {0: 80 * GIB, 1: 24 * GIB})
    settings = Settings(
        home=tmp_path,
        models={
            "a": ModelEntry(source=str(tiny_model.hf_dir), engine="transformers", device="cuda:1"),
            "b": ModelEntry(source=str(tiny_model.gguf), engine="llamacpp"),
        },
        memory_budget_mb=4096,
    )
    pool = build_pool(settings, served(settings, []))
    assert pool.budget_bytes == 4 * GIB
    assert pool.gpu_budget == {0: int(80 * GIB * 0.9), 1: int(24 * GIB * 0.9)}
    a, b = pool.status()
    assert a["memory_bytes"] == 0 and set(a["gpu_memory_bytes"]) == {1}
    assert b["memory_bytes"] > 0 and b["gpu_memory_bytes"] == {}
    fixed = settings.model_copy(update={"gpu_memory_budget_mb": 1024})
    assert build_pool(fixed, served(fixed, [])).gpu_budget == {0: GIB, 1: GIB}
