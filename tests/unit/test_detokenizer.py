"""The transformers engine's incremental detokenizer on the tiny model's byte-level tokenizer:
characters split across tokens come out whole, a cut gives what is held, and the DecodeStream
path, the slow-tokenizer path and the fallback from a refusing stream agree."""

from __future__ import annotations

import pytest

from tests.conftest import require

require("torch")
require("transformers")

from tokenizers import Tokenizer  # noqa: E402

from llmhost.engines.transformers_batch import Detokenizer  # noqa: E402

TEXT = "Prompt: naïve café ☃ 日本語 🎉🙂 done."


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model.hf_dir / "tokenizer.json"))


def stream(tok: Tokenizer, ids: list[int], backend=True, n_context: int = 3) -> list[str]:
    def decode(x):
        return tok.decode(x, skip_special_tokens=True)

    d = Detokenizer(decode, ids[:n_context], tok if backend else None)
    return [d.add(t) for t in ids[n_context:]] + [d.flush()]


def test_characters_split_across_tokens_come_out_whole(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 4  # tokens holding part of one
    chunks = stream(tok, ids)
    assert "".join(chunks) == TEXT[len(tok.decode(ids[:3])) :]
    assert not any("\ufffd" in c for c in chunks)
    assert chunks.count("") > 4  # those give nothing out until their character is whole
    assert stream(tok, ids, backend=False) == chunks


def test_a_cut_inside_a_character_is_given_out_by_flush(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    whole = tok.encode(TEXT[: TEXT.index("🎉")], add_special_tokens=False).ids
    cut = ids[: len(whole) + 1]  # the first byte token of the emoji
    assert tok.decode(cut).endswith("\ufffd")
    chunks = stream(tok, cut)
    assert chunks[-2] == "" and chunks[-1] == "\ufffd"
    assert "".join(chunks[:-1]) == TEXT[len(tok.decode(ids[:3])) : TEXT.index("🎉")]
    assert stream(tok, cut, backend=False) == chunks


def test_a_stream_that_refuses_falls_back_to_decoding_the_window(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids

    class Refusing:
        def step(self, tokenizer, token):
            raise Exception("Invalid prefix encountered")

    d = Detokenizer(lambda x: tok.decode(x, skip_special_tokens=True), ids[:3], tok)
    first = [d.add(t) for t in ids[3:10]]
    d._stream = Refusing()
    rest = [d.add(t) for t in ids[10:]] + [d.flush()]
    assert first + rest == stream(tok, ids)
