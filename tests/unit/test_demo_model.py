import json

import gguf
import numpy as np
from tokenizers import Tokenizer

from llmhost.store.demo import DEMO_SHAPE, SPECIAL_TOKENS, _permute_rope, build_model
from tests.conftest import require


def test_both_formats_written(tiny_model):
    hf = tiny_model.hf_dir
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (hf / name).is_file(), name
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == DEMO_SHAPE.vocab_size
    r = gguf.GGUFReader(tiny_model.gguf)
    assert r.fields["general.architecture"].contents() == "llama"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == DEMO_SHAPE.vocab_size
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names


def test_tokenizer_is_real_and_round_trips(tiny_model):
    tok = Tokenizer.from_file(str(tiny_model.hf_dir / "tokenizer.json"))
    text = "The quick brown fox: 42 ünïcödé!"
    enc = tok.encode(text)
    assert enc.tokens[0] == "<s>"
    assert len(enc.ids) < len(text.encode())  # merges were learned
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    for s in SPECIAL_TOKENS:
        assert tok.token_to_id(s) is not None


def test_same_seed_same_weights(tmp_path):
    a = build_model(tmp_path / "a", formats=("gguf",))
    b = build_model(tmp_path / "b", formats=("gguf",))
    assert a.gguf.read_bytes() == b.gguf.read_bytes()
    c = build_model(tmp_path / "c", formats=("gguf",), seed=1)
    assert a.gguf.read_bytes() != c.gguf.read_bytes()


def test_rope_permutation_pairs_halves():
    # head_dim 4: HF rows (0,1 | 2,3) rotate as pairs (0,2),(1,3); llama.cpp wants them adjacent.
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    p = _permute_rope(w, n_head=2)
    assert p[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_quantized_gguf(tmp_path):
    built = build_model(tmp_path, formats=("gguf",), gguf_quant="q8_0")
    r = gguf.GGUFReader(built.gguf)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_a_large_vocabulary_is_ordinary_text_that_round_trips():
    """Past what the shipped text yields, the vocabulary is learned from made-up words, so a
    random model's output sent back in a conversation costs about as many tokens again."""
    import random

    from llmhost.store.demo import train_tokenizer

    tok = train_tokenizer(4096)
    assert tok.get_vocab_size() == 4096
    assert not [t for t in tok.get_vocab() if t.startswith("<|reserved_")]
    rng = random.Random(3)
    for _ in range(20):
        ids = [rng.randrange(len(SPECIAL_TOKENS), 4096) for _ in range(64)]
        again = tok.encode(tok.decode(ids), add_special_tokens=False).ids
        assert len(again) <= 1.25 * len(ids)


def test_ensure_model_rebuilds_what_an_older_llmhost_built(tmp_path):
    from llmhost.store.demo import REVISION, ensure_model, is_current

    path = ensure_model(tmp_path / "m" / "llmhost-demo.gguf")
    assert is_current(path)
    built = path.stat().st_mtime_ns
    assert ensure_model(path).stat().st_mtime_ns == built  # current: kept
    # an older build: an earlier revision
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llmhost.demo.revision", REVISION - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert not is_current(path)
    assert is_current(ensure_model(path))


def test_the_model_generates_printable_text_only(tiny_model):
    """Tokens whose text is not printable ASCII (control bytes such as ESC, lone bytes of
    multi-byte characters) stay in the vocabulary, so any prompt encodes, but are never
    sampled: not at temperature 2 with every token a candidate."""
    tok = Tokenizer.from_file(str(tiny_model.hf_dir / "tokenizer.json"))
    prompt = "\x1b[31mred\x1b[0m \r ☃ ünï"
    assert tok.decode(tok.encode(prompt).ids, skip_special_tokens=True) == prompt
    llama_cpp = require("llama_cpp")
    model = llama_cpp.Llama(str(tiny_model.gguf), n_ctx=512, verbose=False)
    text = ""
    for seed in range(8):
        out = model.create_completion(
            prompt, max_tokens=100, temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed
        )
        text += out["choices"][0]["text"]
    assert len(text) > 400
    assert all(" " <= c <= "~" or c in "\n\t" for c in text), repr(text)
