"""Capacity planning: the memory a model needs for its weights, its KV cache at a context and
concurrency, and the runtime; which GPUs hold it, with how many for tensor parallelism, and
the largest concurrency that then fits; disk and host RAM.

How the figures are derived (every one is printed with the plan):
- weights = parameters x bytes per parameter of the format (fp16 2, int8 1, q4_0 4.5 bits...);
- KV cache per token = 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16 cache);
  a sequence holds `ctx` tokens, and `concurrency` sequences are held at once;
- runtime = 0.5 GiB of CUDA context and library workspace per GPU, plus the activations and
  logits of one prefill chunk (512 tokens);
- a GPU lends 90% of its memory to the model (vLLM's default gpu_memory_utilization), so a
  plan fits a card when weights/n + KV/n + runtime <= 0.9 x its memory, n GPUs sharing weights
  and KV cache under tensor parallelism (n a power of two that divides the attention heads);
- host RAM keeps the guide's 20% reserve free; disk holds the files in their format.
With Llama-2's shapes at a 4096-token context this gives 15.2 GiB for 7B in fp16 (the guide:
about 15 GB) and 28.0 GiB for 13B, which needs a 32 GB card at 90% use (the guide: at least
32 GB)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmhost.errors import ConfigError

GIB = 1 << 30
RUNTIME_BASE = 0.5 * GIB
PREFILL_CHUNK = 512
GPU_SHARE = 0.9
RAM_RESERVE = 0.2
KV_BYTES = 2  # fp16/bf16 KV cache

# Bits per weight as stored, block scales included (GGUF: ggml's block layouts).
BITS_PER_WEIGHT = {
    "fp32": 32.0,
    "fp16": 16.0,
    "bf16": 16.0,
    "int8": 8.0 + 32 / 4096,  # LLM.int8 / per-row scales: a few bytes a row
    "q8_0": 8.5,
    "int4": 4.0 + 16 / 64,  # NF4/AWQ/GPTQ with a 16-bit scale per group of 64
    "q6_k": 6.5625,
    "q5_k_m": 5.69,
    "q5_0": 5.5,
    "q4_k_m": 4.85,
    "q4_0": 4.5,
    "q3_k_m": 3.91,
    "q2_k": 2.63,
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    nvlink: bool


GPUS: tuple[Gpu, ...] = (
    Gpu("RTX 4090", 24, False),
    Gpu("A10", 24, False),
    Gpu("A30", 24, True),
    Gpu("L4", 24, False),
    Gpu("V100 32GB", 32, True),
    Gpu("A100 40GB", 40, True),
    Gpu("L40S", 48, False),
    Gpu("A100 80GB", 80, True),
    Gpu("H100 80GB", 80, True),
    Gpu("H200", 141, True),
)


@dataclass(frozen=True)
class Shape:
    """What the plan needs of an architecture (a Llama-style decoder)."""

    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_context: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES


def llama_params(
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    tied: bool = False,
) -> int:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    per_layer = attn + mlp + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


def _preset(name, layers, hidden, heads, kv, inter, vocab, ctx) -> Shape:
    return Shape(
        name,
        llama_params(layers, hidden, heads, kv, inter, vocab),
        layers,
        hidden,
        heads,
        kv,
        inter,
        vocab,
        ctx,
    )


# Well-known shapes, used for `--params` and as the nearest architecture for other sizes.
PRESETS = (
    _preset("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000, 4096),
    _preset("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
    _preset("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000, 4096),
    _preset("Qwen2.5-32B", 64, 5120, 40, 8, 27648, 152064, 32768),
    _preset("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000, 4096),
    _preset("Llama-3.1-405B", 126, 16384, 128, 8, 53248, 128256, 131072),
)


def parse_params(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*", text.upper())
    if not m:
        raise ConfigError(f"--params {text!r}: give a count such as 7B, 13B or 500M")
    n = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]
    if not 1e6 <= n <= 1e13:
        raise ConfigError(f"--params {text!r} is outside 1M..10T")
    return n


def shape_for_params(params: float) -> tuple[Shape, str]:
    """The nearest preset's architecture, its KV cache scaled to the requested size."""
    near = min(PRESETS, key=lambda s: abs(math.log(s.params / params)))
    if abs(near.params / params - 1) < 0.08:
        return near, f"architecture of {near.name}"
    layers = max(1, round(near.layers * (params / near.params) ** 0.5))
    shape = Shape(
        f"{params / 1e9:g}B",
        params,
        layers,
        near.hidden,
        near.heads,
        near.kv_heads,
        near.intermediate,
        near.vocab,
        near.max_context,
    )
    return shape, f"estimated from {near.name} with {layers} layers (give --model for exact)"


def shape_from_hf_config(cfg: dict[str, Any], name: str) -> Shape:
    text = cfg.get("text_config", cfg)  # multimodal configs nest the language model
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv = int(text.get("num_key_value_heads") or heads)
        inter = int(text.get("intermediate_size") or 4 * hidden)
        vocab = int(text.get("vocab_size") or 32000)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: config.json lacks {exc} for a plan") from exc
    ctx = int(text.get("max_position_embeddings") or 4096)
    params = llama_params(
        layers, hidden, heads, kv, inter, vocab, tied=bool(text.get("tie_word_embeddings", False))
    )
    return Shape(name, params, layers, hidden, heads, kv, inter, vocab, ctx)


def _file_type(value: Any) -> str | None:
    """general.file_type as a format of BITS_PER_WEIGHT (MOSTLY_Q4_K_M is q4_k_m, ALL_F32
    fp32); None for a type the table lacks."""
    import gguf

    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return None
    name = name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    name = {"f32": "fp32", "f16": "fp16"}.get(name, name)
    return name if name in BITS_PER_WEIGHT else None


def shape_from_gguf(path: Path) -> tuple[Shape, str | None]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture") or "llama"
    hidden = field(f"{arch}.embedding_length")
    layers = field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    if not (hidden and layers and heads):
        raise ConfigError(f"{path}: GGUF metadata lacks the shape of a {arch} model")
    kv = field(f"{arch}.attention.head_count_kv") or heads
    params = sum(int(t.n_elements) for t in reader.tensors)
    ftype = _file_type(field("general.file_type"))
    shape = Shape(
        field("general.name") or path.stem,
        params,
        int(layers),
        int(hidden),
        int(heads),
        int(kv),
        int(field(f"{arch}.feed_forward_length") or 4 * hidden),
        int(field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens") or []) or 32000),
        int(field(f"{arch}.context_length") or 4096),
    )
    return shape, ftype


def tp_ok(shape: Shape, n: int) -> bool:
    """vLLM's rule: attention heads split evenly; KV heads split evenly or are replicated."""
    if shape.heads % n:
        return False
    return shape.kv_heads % n == 0 if shape.kv_heads >= n else n % shape.kv_heads == 0


def kv_split(shape: Shape, n: int) -> int:
    """Over how many GPUs the KV cache spreads (replicated KV heads do not split further)."""
    return min(n, shape.kv_heads)


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    memory_gib: float
    gpus_needed: int | None  # None: no power-of-two count up to 8 holds it
    max_concurrency: int
    interconnect: str


@dataclass(frozen=True)
class Plan:
    model: str
    source: str
    params_b: float
    quant: str
    ctx: int
    concurrency: int
    weights_gib: float
    kv_per_token_kib: float
    kv_per_sequence_gib: float
    kv_cache_gib: float
    runtime_gib: float
    total_gib: float
    disk_gib: float
    host_ram_gib: float
    gpus: list[GpuFit]
    derivation: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_bytes(shape: Shape, quant: str, ctx: int | None, concurrency: int) -> int:
    """What a model holds in memory served on a CPU: its weights and its KV cache at `ctx`
    tokens (default: its own context, capped at 4096) for `concurrency` sequences."""
    bits = BITS_PER_WEIGHT.get(quant.lower(), BITS_PER_WEIGHT["fp16"])
    ctx = ctx or min(shape.max_context, 4096)
    return int(shape.params * bits / 8 + shape.kv_bytes_per_token() * ctx * concurrency)


def _runtime_bytes(shape: Shape) -> float:
    activations = PREFILL_CHUNK * (4 * shape.hidden + 2 * shape.intermediate) * 2
    logits = PREFILL_CHUNK * shape.vocab * 4
    return RUNTIME_BASE + activations + logits


def make_plan(
    shape: Shape,
    *,
    quant: str = "fp16",
    ctx: int | None = None,
    concurrency: int = 1,
    gpus: tuple[Gpu, ...] = GPUS,
    source: str = "",
) -> Plan:
    quant = quant.lower()
    if quant not in BITS_PER_WEIGHT:
        raise ConfigError(f"unknown --quant {quant!r}; one of {', '.join(BITS_PER_WEIGHT)}")
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    ctx = ctx or min(shape.max_context, 4096)
    if not 1 <= ctx <= 10_000_000:
        raise ConfigError("--ctx must be between 1 and 10,000,000 tokens")
    weights = shape.params * BITS_PER_WEIGHT[quant] / 8
    kv_token = shape.kv_bytes_per_token()
    kv_seq = kv_token * ctx
    kv = kv_seq * concurrency
    runtime = _runtime_bytes(shape)
    fits = []
    for g in gpus:
        usable = g.memory_gib * GIB * GPU_SHARE
        need = None
        for n in (1, 2, 4, 8):
            if tp_ok(shape, n) and weights / n + kv / kv_split(shape, n) + runtime <= usable:
                need = n
                break
        most = 0
        if need is not None:
            room = usable - weights / need - runtime
            most = int(room // (kv_seq / kv_split(shape, need)))
        link = (
            "single GPU" if need in (None, 1) else ("NVLink" if g.nvlink else "PCIe (slow for TP)")
        )
        fits.append(GpuFit(g.name, g.memory_gib, need, most, link))
    total = weights + kv + runtime
    bits = BITS_PER_WEIGHT[quant]
    derivation = [
        f"weights: {shape.params / 1e9:.2f}B params x {bits:g} bits = {weights / GIB:.2f} GiB",
        f"KV cache: 2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} "
        f"head dim x {KV_BYTES} B = {kv_token / 1024:.0f} KiB/token; x {ctx} tokens x "
        f"{concurrency} sequences = {kv / GIB:.2f} GiB",
        f"runtime: {RUNTIME_BASE / GIB} GiB CUDA context + a {PREFILL_CHUNK}-token prefill's "
        f"activations and logits = {runtime / GIB:.2f} GiB",
        f"a GPU lends {GPU_SHARE:.0%} of its memory to the model; n GPUs split weights and KV",
        f"host RAM: (weights + 2 GiB process) / {1 - RAM_RESERVE:.0%}, keeping the guide's "
        f"{RAM_RESERVE:.0%} reserve free",
    ]
    return Plan(
        model=shape.name,
        source=source,
        params_b=round(shape.params / 1e9, 3),
        quant=quant,
        ctx=ctx,
        concurrency=concurrency,
        weights_gib=round(weights / GIB, 2),
        kv_per_token_kib=round(kv_token / 1024, 1),
        kv_per_sequence_gib=round(kv_seq / GIB, 3),
        kv_cache_gib=round(kv / GIB, 2),
        runtime_gib=round(runtime / GIB, 2),
        total_gib=round(total / GIB, 2),
        disk_gib=round(weights * 1.02 / GIB, 1),  # + tokenizer, config, format headers
        host_ram_gib=round((weights + 2 * GIB) / (1 - RAM_RESERVE) / GIB, 1),
        gpus=fits,
        derivation=derivation,
    )


def shape_from_model(ref: str, models_dir: Path) -> tuple[Shape, str | None, str]:
    """A model path (GGUF file or HF folder) or a stored name:tag; returns the shape, the
    quantization the file has (if known) and a description of the source."""
    path = Path(ref).expanduser()
    if not path.exists():
        from llmhost.store.registry import ModelStore

        try:
            path = ModelStore(models_dir).resolve(ref)
        except LookupError as exc:
            raise ConfigError(f"model not found: {ref} ({exc})") from exc
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{cfg}: {exc}") from exc
            dtype = str(data.get("torch_dtype") or "").replace("float", "fp").replace("bfp", "bf")
            quant = dtype if dtype in ("fp16", "bf16", "fp32") else None
            return shape_from_hf_config(data, path.name), quant, f"{cfg}"
        if ggufs:
            path = ggufs[0]
        else:
            raise ConfigError(f"{path}: neither config.json nor a .gguf file")
    shape, quant = shape_from_gguf(path)
    return shape, quant, str(path)
