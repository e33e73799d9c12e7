"""The llama.cpp engine on the tiny real GGUF: metadata, model files and folders, encrypted
models. What every engine does alike (batching, seeds, stops, EOS, cancellation, limits, bad
inputs) is in tests/conformance."""

from __future__ import annotations

import pytest

from tests.conftest import require

require("llama_cpp")

from llmhost.engines.llamacpp import LlamaCppEngine  # noqa: E402
from llmhost.types import GenerationRequest, SamplingParams  # noqa: E402


async def run(engine, prompt, **sampling):
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    ids, text, last = [], [], None
    async for d in engine.stream(
        GenerationRequest(prompt=prompt, sampling=SamplingParams(**sampling))
    ):
        ids.extend(d.token_ids)
        text.append(d.text)
        last = d
    return "".join(text), ids, last.finish_reason, last.usage


@pytest.fixture
def make_engine(tiny_model, start_engine):
    async def make(**kw):
        kw.setdefault("threads", 2)
        return await start_engine(LlamaCppEngine(tiny_model.gguf, **kw))

    return make


async def test_loads_metadata(make_engine):
    e = await make_engine(parallel=2, ctx_size=256)
    assert e.model_info.id == "llmhost-demo"
    assert e.model_info.context_length == 256
    assert e.bos_token == "<s>" and e.eos_token == "<|im_end|>"
    assert "im_start" in e.chat_template
    assert e.tokenize("Hello")[0] == e.tokenize("")[0]  # BOS first
    assert e.health().ok


async def test_model_folder_and_bad_paths(tiny_model, tmp_path):
    import shutil

    from llmhost.errors import ModelLoadError

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_model.gguf, folder / "model.gguf")
    e = LlamaCppEngine(folder, threads=1, parallel=1)
    await e.start()
    try:
        assert e.model_info.id == "model"  # named after the file, not the folder
        assert (await run(e, "hi", max_tokens=2))[3].completion_tokens == 2
    finally:
        await e.close()
    shutil.copy(tiny_model.gguf, folder / "other.gguf")
    with pytest.raises(ModelLoadError, match="exactly one"):
        await LlamaCppEngine(folder).start()
    with pytest.raises(ModelLoadError, match="not found"):
        await LlamaCppEngine(tmp_path / "missing.gguf").start()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError):
        await LlamaCppEngine(bad).start()


async def test_encrypted_model_loads_without_plaintext_left(tiny_model, tmp_path, shm):
    from llmhost.errors import DecryptionError
    from llmhost.store import crypto

    key = bytes(range(32))
    enc = crypto.encrypt_file(tiny_model.gguf, tmp_path / "demo.gguf.enc", key)
    plain = LlamaCppEngine(tiny_model.gguf, threads=2, parallel=1)
    sealed = LlamaCppEngine(enc, threads=2, parallel=1, key_loader=lambda: key, decrypt_dir=shm)
    await plain.start()
    await sealed.start()
    try:
        assert list(shm.iterdir()) == []  # nothing left once loaded
        assert sealed.model_info.id == "demo"
        a = await run(plain, "The sea", max_tokens=10)
        b = await run(sealed, "The sea", max_tokens=10)
        assert a[1] == b[1]
    finally:
        await plain.close()
        await sealed.close()
    wrong = LlamaCppEngine(enc, key_loader=lambda: bytes(32), decrypt_dir=shm)
    with pytest.raises(DecryptionError, match="wrong key"):
        await wrong.start()
    assert list(shm.iterdir()) == []
    from llmhost.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="encrypted"):
        await LlamaCppEngine(enc, decrypt_dir=shm).start()
