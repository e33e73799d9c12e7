"""`llmhost demo-model`: build the tiny offline demo model (or a benchmark-shaped one)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmhost.errors import ConfigError


def demo_model(
    path: Path = typer.Argument(..., help="Folder to write the model into."),
    shape: str = typer.Option("demo", help="demo (tiny) or tinyllama (1.1B shape)."),
    quant: str = typer.Option("f32", help="GGUF tensor type: f32, f16, q8_0 or q4_0."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    fmt: str = typer.Option("both", "--format", help="gguf, hf or both."),
) -> None:
    """Build a Llama-architecture model with random weights and a real tokenizer, as GGUF
    and as a Hugging Face folder. Its output is meaningless; it needs no network."""
    from llmhost.store.demo import DEMO_SHAPE, TINYLLAMA_SHAPE, build_model

    shapes = {"demo": DEMO_SHAPE, "tinyllama": TINYLLAMA_SHAPE}
    if shape not in shapes:
        raise ConfigError(f"unknown shape {shape!r}; one of {', '.join(shapes)}")
    formats = {"gguf": ("gguf",), "hf": ("hf",), "both": ("gguf", "hf")}.get(fmt)
    if formats is None:
        raise ConfigError(f"unknown format {fmt!r}; one of gguf, hf, both")
    try:
        built = build_model(
            path,
            shape=shapes[shape],
            seed=seed,
            gguf_quant=quant,
            name=f"llmhost-{shape}",
            formats=formats,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if built.gguf:
        typer.echo(f"GGUF:         {built.gguf}")
    if built.hf_dir:
        typer.echo(f"Hugging Face: {built.hf_dir}")
