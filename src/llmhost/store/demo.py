"""Builds small Llama-architecture models offline: random weights and a real byte-level BPE
tokenizer trained on text shipped with the package, written both as GGUF (llama.cpp) and as a
Hugging Face folder (transformers) holding the same numbers. The output is meaningless; the
models exist to exercise the whole serving path without a download.

Steps: train the tokenizer -> draw weights from a seeded generator -> write the HF folder
(config.json, tokenizer files, model.safetensors) -> write the GGUF with Q/K rows permuted to
llama.cpp's rotary layout -> rename each file into place only once complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from llmhost.chatml import FALLBACK_TEMPLATE

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
log = logging.getLogger("llmhost.store.demo")

CHAT_TEMPLATE = "{{ bos_token }}" + FALLBACK_TEMPLATE
SHIPPED_VOCAB = 1024  # the most tokens the shipped text alone is trained into
# Bumped whenever the same shape and seed would build another model (tokenizer, metadata):
# models built by an older llmhost are rebuilt on first use.
REVISION = 3
# What the output layer takes off the logit of a token that is not printable text, divided by
# the RMS of the last hidden state (about 1 to 3): far past what any temperature up to 2 can
# bring back, and small enough for fp16.
UNPRINTABLE_PENALTY = 2000.0


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


DEMO_SHAPE = ModelShape()
# TinyLlama-1.1B's exact shape, for benchmarks that must cost what a real small model costs.
TINYLLAMA_SHAPE = ModelShape(
    vocab_size=32000,
    hidden_size=2048,
    num_layers=22,
    num_heads=32,
    num_kv_heads=4,
    intermediate_size=5632,
    context_length=2048,
)


@dataclass(frozen=True)
class BuiltModel:
    gguf: Path | None
    hf_dir: Path | None


def _corpus() -> str:
    return resources.files("llmhost.store").joinpath("demo_corpus.txt").read_text("utf-8")


def _word_corpus(n_lines: int) -> str:
    """Made-up words of one to three syllables, deterministic: enough distinct pairs for the
    BPE trainer to learn a vocabulary of tens of thousands of tokens."""
    import random

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    drawn = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(60000)}
    words = sorted(drawn)
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_lines))


def train_tokenizer(vocab_size: int):
    """A GPT-2 style byte-level BPE of exactly `vocab_size` tokens. A vocabulary larger than
    the shipped text yields is learned from made-up words as well, so that every token is
    ordinary text: a random model's output, sent back in a conversation, tokenizes to about
    as many tokens as were generated, as a real model's does."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [_corpus()] * 4
    if vocab_size > SHIPPED_VOCAB:
        texts.append(_word_corpus(20000))
    tok.train_from_iterator(texts, trainer=trainer)
    extra = vocab_size - tok.get_vocab_size()
    if extra < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the trained vocabulary")
    # Whatever the text did not yield: ordinary (not special) tokens with visible text.
    tok.add_tokens(
        [AddedToken(f"<|reserved_{i}|>", special=False, normalized=False) for i in range(extra)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def _weights(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights. Embeddings and the output layer get a wider spread than
    the blocks so that logits differ enough for sampling settings to matter."""
    rng = np.random.default_rng(seed)
    h, hd = shape.hidden_size, shape.head_dim

    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": mat(shape.vocab_size, h, 1.0),
        "model.norm.weight": np.ones(h, dtype=np.float32),
        "lm_head.weight": mat(shape.vocab_size, h, 2.0 / np.sqrt(h)),
    }
    std = 1.0 / np.sqrt(h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = mat(shape.num_heads * hd, h, std)
        w[p + "self_attn.k_proj.weight"] = mat(shape.num_kv_heads * hd, h, std)
        w[p + "self_attn.v_proj.weight"] = mat(shape.num_kv_heads * hd, h, std)
        w[p + "self_attn.o_proj.weight"] = mat(h, shape.num_heads * hd, std)
        w[p + "mlp.gate_proj.weight"] = mat(shape.intermediate_size, h, std)
        w[p + "mlp.up_proj.weight"] = mat(shape.intermediate_size, h, std)
        w[p + "mlp.down_proj.weight"] = mat(
            h, shape.intermediate_size, 1.0 / np.sqrt(shape.intermediate_size)
        )
    return w


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" or c in "\n\t" for c in text)


def _never_unprintable(w: dict[str, np.ndarray], tok, shape: ModelShape) -> None:
    """Keep the model from generating a token whose text is not printable ASCII: a control
    byte (ESC, CR, ...) or a lone byte of a multi-byte character, whose random sequences make
    control characters and U+FFFD. Such tokens stay in the vocabulary, so any prompt still
    encodes. The last residual dimension is 1 at every position (the embeddings write it, no
    block does); the output layer reads it with weight -UNPRINTABLE_PENALTY for those tokens
    and 0 for the others, whose logits are unchanged. The weight, not the activation, is
    large, so int8 activations keep their precision."""
    banned = [
        i
        for t, i in tok.get_vocab().items()
        if t not in SPECIAL_TOKENS and not _printable(tok.decode([i]))
    ]
    d = shape.hidden_size - 1
    w["model.embed_tokens.weight"][:, d] = 1.0
    for i in range(shape.num_layers):
        w[f"model.layers.{i}.self_attn.o_proj.weight"][d, :] = 0.0
        w[f"model.layers.{i}.mlp.down_proj.weight"][d, :] = 0.0
    w["lm_head.weight"][:, d] = 0.0
    w["lm_head.weight"][banned, d] = -UNPRINTABLE_PENALTY


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF rotates halves of each head; llama.cpp rotates adjacent pairs.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_tensors(w: dict[str, np.ndarray], shape: ModelShape):
    yield "token_embd.weight", w["model.embed_tokens.weight"]
    yield "output_norm.weight", w["model.norm.weight"]
    yield "output.weight", w["lm_head.weight"]
    for i in range(shape.num_layers):
        for hf, gg in _GGUF_NAMES.items():
            t = w[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute_rope(t, shape.num_heads)
            elif hf == "self_attn.k_proj":
                t = _permute_rope(t, shape.num_kv_heads)
            yield f"blk.{i}.{gg}.weight", t


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_gguf(
    path: Path, tok, w: dict[str, np.ndarray], shape: ModelShape, name: str, quant: str = "f32"
) -> None:
    import gguf

    qtypes = {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }
    if quant not in qtypes:
        raise ValueError(f"unsupported quantization {quant!r}; one of {', '.join(qtypes)}")
    qtype, ftype = qtypes[quant]
    tmp = _tmp(path)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.num_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_heads)
    writer.add_head_count_kv(shape.num_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(ftype)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(SPECIAL_TOKENS)
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab[BOS])
    writer.add_eos_token_id(vocab[IM_END])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_uint32("llmhost.demo.revision", REVISION)

    for tname, t in _gguf_tensors(w, shape):
        # Norms stay f32 as llama.cpp's converters keep them; so do rows too short to block.
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or t.shape[-1] % 32:
            writer.add_tensor(tname, t)
        else:
            writer.add_tensor(tname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


def write_hf(out: Path, tok, w: dict[str, np.ndarray], shape: ModelShape) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.context_length,
        "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[IM_END],
        "torch_dtype": "float32",
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": shape.context_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    generation = {"bos_token_id": vocab[BOS], "eos_token_id": [vocab[IM_END], vocab[EOS]]}
    files = {
        "config.json": config,
        "tokenizer_config.json": tok_config,
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": IM_END, "pad_token": EOS},
        "generation_config.json": generation,
    }
    for fname, data in files.items():
        tmp = _tmp(out / fname)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out / fname)
    tmp = _tmp(out / "tokenizer.json")
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    tmp = _tmp(out / "model.safetensors")
    save_file(w, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def build_model(
    out_dir: Path,
    *,
    shape: ModelShape = DEMO_SHAPE,
    seed: int = 0,
    name: str = "llmhost-demo",
    gguf_quant: str = "f32",
    formats: tuple[str, ...] = ("gguf", "hf"),
) -> BuiltModel:
    """Write `out_dir/<name>.gguf` and/or `out_dir/hf/`; same seed, same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(shape.vocab_size)
    w = _weights(shape, seed)
    _never_unprintable(w, tok, shape)
    gguf_path = hf_dir = None
    if "hf" in formats:
        hf_dir = out_dir / "hf"
        write_hf(hf_dir, tok, w, shape)
    if "gguf" in formats:
        gguf_path = out_dir / f"{name}.gguf"
        write_gguf(gguf_path, tok, w, shape, name, gguf_quant)
    (out_dir / "shape.json").write_text(json.dumps(asdict(shape), indent=2) + "\n")
    return BuiltModel(gguf=gguf_path, hf_dir=hf_dir)


def _metadata(path: Path, *keys: str) -> list:
    """Values of GGUF metadata `keys` (None where absent); only the header is read."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return [f.contents() if (f := fields.get(k)) is not None else None for k in keys]


def gguf_chat_template(path: Path) -> str | None:
    """The chat template a GGUF file carries."""
    return _metadata(path, "tokenizer.chat_template")[0]


def is_current(path: Path) -> bool:
    """Whether the GGUF at `path` is what this llmhost would build (revision and template)."""
    revision, template = _metadata(path, "llmhost.demo.revision", "tokenizer.chat_template")
    return revision == REVISION and template == CHAT_TEMPLATE


def ensure_model(
    path: Path,
    shape: ModelShape = DEMO_SHAPE,
    quant: str = "f32",
    formats: tuple[str, ...] = ("gguf",),
) -> Path:
    """The GGUF at `path` (with the Hugging Face folder beside it when `formats` asks for
    one), built when missing or rebuilt when an older llmhost built it (another chat template
    or tokenizer)."""
    path = Path(path)
    if path.exists() and not is_current(path):
        log.info("%s was built by an older llmhost; rebuilding it", path)
        path.unlink()
    if not path.exists():
        build_model(path.parent, shape=shape, name=path.stem, gguf_quant=quant, formats=formats)
    return path


def ensure_demo_model(models_dir: Path) -> Path:
    """The demo GGUF and its Hugging Face folder under `models_dir/demo`."""
    return ensure_model(Path(models_dir) / "demo" / "llmhost-demo.gguf", formats=("gguf", "hf"))
