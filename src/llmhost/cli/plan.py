"""`llmhost plan`: GPU memory, disk and RAM a model needs, and which GPUs hold it."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from llmhost.config import load_settings
from llmhost.errors import ConfigError
from llmhost.ops.plan import GPUS, make_plan, parse_params, shape_for_params, shape_from_model


def plan(
    model: str | None = typer.Option(
        None, "--model", "-m", help="GGUF file, model folder or stored name:tag."
    ),
    params: str | None = typer.Option(None, "--params", help="Size instead, e.g. 7B, 13B, 70B."),
    quant: str | None = typer.Option(
        None,
        help="fp16, bf16, fp32, int8, int4, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ... "
        "[the model's own, else fp16]",
    ),
    ctx: int | None = typer.Option(None, "--ctx", help="Context tokens per sequence [4096]."),
    concurrency: int = typer.Option(1, help="Sequences held at once."),
    gpu: list[str] = typer.Option([], "--gpu", help="Only these GPUs (name fragment, repeat)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Memory for weights + KV cache + runtime, the GPUs that hold it (tensor parallel degree,
    largest concurrency), disk and host RAM; every figure with how it was derived."""
    if (model is None) == (params is None):
        raise ConfigError("give --model or --params (one of them)")
    if model is not None:
        shape, own_quant, source = shape_from_model(model, load_settings().models_dir)
    else:
        shape, source = shape_for_params(parse_params(params or ""))
        own_quant = None
    gpus = GPUS
    if gpu:
        gpus = tuple(g for g in GPUS if any(f.lower() in g.name.lower() for f in gpu))
        if not gpus:
            raise ConfigError(
                f"no known GPU matches {', '.join(gpu)}; known: " + ", ".join(g.name for g in GPUS)
            )
    p = make_plan(
        shape,
        quant=quant or own_quant or "fp16",
        ctx=ctx,
        concurrency=concurrency,
        gpus=gpus,
        source=source,
    )
    if as_json:
        typer.echo(json.dumps(p.to_dict()))
        return
    out = Console()
    out.print(
        f"[bold]{p.model}[/] ({p.params_b:g}B params, {p.quant}, context {p.ctx}, "
        f"{p.concurrency} sequence{'s' if p.concurrency > 1 else ''}) — {p.source}",
        highlight=False,
    )
    out.print(
        f"GPU memory: {p.total_gib:.1f} GiB = weights {p.weights_gib:.1f} + KV cache "
        f"{p.kv_cache_gib:.2f} + runtime {p.runtime_gib:.2f}",
        highlight=False,
    )
    out.print(f"Disk: {p.disk_gib:.1f} GiB   Host RAM: {p.host_ram_gib:.1f} GiB", highlight=False)
    table = Table("GPU", "memory", "GPUs needed", "max concurrency", "link")
    for f in p.gpus:
        table.add_row(
            f.gpu,
            f"{f.memory_gib:g} GiB",
            "does not fit in 8" if f.gpus_needed is None else str(f.gpus_needed),
            str(f.max_concurrency) if f.gpus_needed else "-",
            f.interconnect,
        )
    out.print(table)
    for line in p.derivation:
        out.print(f"  · {line}", highlight=False, style="dim")
