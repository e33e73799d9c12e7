"""Tiny BERT models built offline from random weights and a WordPiece vocabulary learned from
the demo corpus, written in both formats from the same weights: a Hugging Face folder and a
GGUF file. `kind="embedding"` gives a sentence-transformers encoder (mean pooling, normalised,
as its modules.json declares); `kind="rerank"` a cross-encoder (BertForSequenceClassification,
one logit), whose pooler and classifier are llama.cpp's rank head (`cls`, `cls.output`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmhost.store.demo import BuiltModel, _corpus, _word_corpus

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class BertShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    positions: int
    vocab: int


TINY_BERT = BertShape(hidden=64, layers=2, heads=4, intermediate=128, positions=512, vocab=1024)
BERT_BASE = BertShape(
    hidden=768, layers=12, heads=12, intermediate=3072, positions=512, vocab=30522
)


def _tokenizer(shape: BertShape):
    """A lower-casing WordPiece tokenizer (BERT's uncased) learned from the demo corpus."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    texts = [_corpus()] * 2
    if shape.vocab > 2000:
        texts.append(_word_corpus(20000))
    tok.train_from_iterator(
        texts, vocab_size=shape.vocab, special_tokens=list(SPECIALS), show_progress=False
    )
    return tok


def _sentence_transformers_layout(folder: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)


def _gguf_name(name: str, rerank: bool, tmap) -> str | None:
    """The llama.cpp tensor name of a Hugging Face BERT tensor (None: not used)."""
    name = name.removeprefix("bert.")
    if name == "embeddings.position_ids" or name.startswith("cls."):
        return None
    suffix = name.rsplit(".", 1)[1]
    if name.startswith("pooler.dense."):  # the rank head's first layer (tanh after it)
        return f"cls.{suffix}" if rerank else None
    if name.startswith("classifier."):
        return f"cls.output.{suffix}"
    return tmap.get_name(name, try_suffixes=(".weight", ".bias"))


def build_bert(
    root: Path,
    kind: Literal["embedding", "rerank"] = "embedding",
    shape: BertShape = TINY_BERT,
    seed: int = 0,
) -> BuiltModel:
    """Write `root/hf` (safetensors, tokenizer) and `root/<name>.gguf` from the same weights."""
    rerank = kind == "rerank"
    hf = root / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(hf, shape)
    model = _hf_model(shape, vocab, rerank, seed)
    model.save_pretrained(hf, safe_serialization=True)
    if not rerank:
        _sentence_transformers_layout(hf)
    path = root / f"llmhost-bert-{kind}.gguf"
    _write_gguf(path, model, vocab, shape, kind)
    return BuiltModel(gguf=path, hf_dir=hf)


def _save_tokenizer(hf: Path, shape: BertShape) -> list[str]:
    """The WordPiece tokenizer in `hf`; its vocabulary in id order."""
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # not in its hints

    tok = _tokenizer(shape)
    ids = tok.get_vocab()
    BertTokenizerFast(
        tokenizer_object=tok._tokenizer,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=shape.positions,
    ).save_pretrained(hf)
    return sorted(ids, key=ids.__getitem__)


def _hf_model(shape: BertShape, vocab: list[str], rerank: bool, seed: int) -> Any:
    """A BERT of random weights: with a one-logit classification head for a reranker."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.positions,
        type_vocab_size=2,
        num_labels=1,  # type: ignore[call-arg]  # a PretrainedConfig keyword
        pad_token_id=vocab.index("[PAD]"),
    )
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if rerank else BertModel)(config).eval()
    # Both segment types share one embedding: llama.cpp feeds every token as type 0, so the
    # two formats agree on (query, document) pairs whichever type a tokenizer gives them.
    with torch.no_grad():
        emb = (model.bert if rerank else model).embeddings.token_type_embeddings.weight
        emb[1] = emb[0]
        if rerank:  # a wider head: random relevance scores spread over (0, 1), not all ~0.5
            model.classifier.weight.mul_(200.0)
    return model


def _write_gguf(path: Path, model: Any, vocab: list[str], shape: BertShape, kind: str) -> None:
    """The same weights and vocabulary as a llama.cpp BERT GGUF (f32)."""
    import gguf

    rerank = kind == "rerank"
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"llmhost tiny BERT {kind}")
    writer.add_context_length(shape.positions)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_layer_norm_eps(model.config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK if rerank else gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(writer, vocab)
    tmap = gguf.TensorNameMap(arch, shape.layers)
    for name, tensor in model.state_dict().items():
        target = _gguf_name(name, rerank, tmap)
        if target is not None:
            writer.add_tensor(target, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer: Any, vocab: list[str]) -> None:
    import gguf

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    # llama.cpp's WordPiece marks word starts ("▁word") where BERT marks continuations
    tokens = [t if t in SPECIALS else t[2:] if t.startswith("##") else "\u2581" + t for t in vocab]
    types = [
        gguf.TokenType.UNKNOWN
        if t == "[UNK]"
        else gguf.TokenType.CONTROL
        if t in SPECIALS
        else gguf.TokenType.NORMAL
        for t in vocab
    ]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_bos_token_id(vocab.index("[CLS]"))
    writer.add_sep_token_id(vocab.index("[SEP]"))
    writer.add_unk_token_id(vocab.index("[UNK]"))
    writer.add_pad_token_id(vocab.index("[PAD]"))
    writer.add_mask_token_id(vocab.index("[MASK]"))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
