"""The llama.cpp engine on the tiny real GGUF: batching correctness, sampling, cancellation,
queue limits and context checks."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import require

require("llama_cpp")

from llmhost.engines.llamacpp import LlamaCppEngine  # noqa: E402
from llmhost.errors import ContextLengthExceeded, InvalidRequest, Overloaded  # noqa: E402
from llmhost.types import GenerationRequest, SamplingParams  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Operators care about the first token and",
    "A",
    "Models are large files and downloads fail. A careful downloader fetches several ranges",
    "def handler(request):",
    "User: What is the capital of France?\nAssistant:",
    "Numbers like 0, 1, 2, 3",
    "Security is not an afterthought.",
]


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


async def test_greedy_alone_equals_batched_among_seven_others(make_engine):
    e = await make_engine(parallel=8, ctx_size=256)
    alone = [await run(e, p, max_tokens=24) for p in PROMPTS]
    together = await asyncio.gather(*(run(e, p, max_tokens=24) for p in PROMPTS))
    for a, b in zip(alone, together, strict=True):
        assert a[1] == b[1]
        assert a[0] == b[0]
        assert b[2] == "length" and b[3].completion_tokens == 24
    # greedy runs are deterministic and not all the same
    assert len({tuple(a[1]) for a in alone}) > 1


async def test_sixteen_mixed_requests_on_four_slots(make_engine):
    e = await make_engine(parallel=4, ctx_size=256, max_queue=16)
    lengths = [1, 3, 5, 8, 13, 21, 34, 2, 4, 6, 9, 15, 25, 40, 7, 11]
    results = await asyncio.gather(
        *(
            run(e, PROMPTS[i % 8], max_tokens=n, temperature=0.8, seed=i)
            for i, n in enumerate(lengths)
        )
    )
    for n, (_, ids, finish, usage) in zip(lengths, results, strict=True):
        assert finish == "length"
        assert usage.completion_tokens == n == len(ids)
        assert usage.prompt_tokens > 0
    assert e.health().stats["running"] == 0


async def test_chunked_prefill_gives_same_tokens(make_engine):
    long_prompt = " ".join(PROMPTS) * 3
    big = await make_engine(parallel=2, ctx_size=512, batch_size=512)
    small = await make_engine(parallel=2, ctx_size=512, batch_size=16)
    assert len(big.tokenize(long_prompt)) > 100
    a = await run(big, long_prompt, max_tokens=12)
    b = await run(small, long_prompt, max_tokens=12)
    assert a[1] == b[1]


async def test_seeded_sampling_is_reproducible(make_engine):
    e = await make_engine(parallel=2)
    a = await run(e, "The sea", max_tokens=20, temperature=1.0, seed=42)
    b = await run(e, "The sea", max_tokens=20, temperature=1.0, seed=42)
    c = await run(e, "The sea", max_tokens=20, temperature=1.0, seed=43)
    assert a[1] == b[1]
    assert a[1] != c[1]
    k1 = await run(e, "The sea", max_tokens=20, temperature=1.0, top_k=1, seed=5)
    greedy = await run(e, "The sea", max_tokens=20)
    assert k1[1] == greedy[1]  # top_k=1 is greedy whatever the seed


async def test_stop_string_truncates(make_engine):
    e = await make_engine(parallel=1)
    full, *_ = await run(e, "The quick", max_tokens=30)
    stop = full[10:13]
    assert stop and stop in full
    text, _, finish, _ = await run(e, "The quick", max_tokens=30, stop=(stop,))
    assert finish == "stop"
    assert text == full[: full.index(stop)]


async def test_cancel_frees_the_slot(make_engine):
    e = await make_engine(parallel=1, ctx_size=2048, max_queue=4)
    agen = e.stream(
        GenerationRequest(prompt="hello", sampling=SamplingParams(max_tokens=2000, ignore_eos=True))
    )
    await anext(agen)
    await anext(agen)
    assert e.health().stats["running"] == 1
    await agen.aclose()
    t0 = time.monotonic()
    _text, ids, finish, _ = await asyncio.wait_for(run(e, "next", max_tokens=5), timeout=10)
    assert len(ids) == 5 and finish == "length"
    assert time.monotonic() - t0 < 5
    assert e.health().stats["running"] == 0


async def test_queue_full_is_overloaded(make_engine):
    e = await make_engine(parallel=1, max_queue=1)
    long = SamplingParams(max_tokens=1500, ignore_eos=True)
    a = e.stream(GenerationRequest(prompt="a", sampling=long))
    await anext(a)  # running
    b = e.stream(GenerationRequest(prompt="b", sampling=long))
    waiting = asyncio.create_task(anext(b))  # queued behind a
    await asyncio.sleep(0.05)
    c = e.stream(GenerationRequest(prompt="c", sampling=long))
    with pytest.raises(Overloaded) as exc:
        await anext(c)
    assert exc.value.status_code == 503
    await a.aclose()
    await asyncio.wait_for(waiting, timeout=10)  # b gets the freed slot
    await b.aclose()


async def test_context_and_token_checks(make_engine):
    e = await make_engine(parallel=1, ctx_size=256)
    n_ctx = e.model_info.context_length
    assert n_ctx == 256
    with pytest.raises(ContextLengthExceeded):
        await run(e, "word " * 300, max_tokens=1)
    with pytest.raises(ContextLengthExceeded, match="max_tokens"):
        await run(e, "hi", max_tokens=n_ctx)
    _, ids, finish, usage = await run(e, "hi", max_tokens=None)
    assert finish == "length" and usage.total_tokens == n_ctx
    with pytest.raises(InvalidRequest, match="vocabulary"):
        await run(e, [1, 2, 10**6], max_tokens=2)
    _text, ids, _, usage = await run(e, [0, 10, 20], max_tokens=3)
    assert usage.prompt_tokens == 3 and len(ids) == 3


async def test_eos_ends_generation_unless_ignored(make_engine):
    e = await make_engine(parallel=4)
    finishes = set()
    for seed in range(40):
        _, _ids, finish, usage = await run(
            e, "x", max_tokens=64, temperature=1.5, seed=seed, ignore_eos=False
        )
        finishes.add(finish)
        if finish == "stop":
            assert usage.completion_tokens < 64
    assert "stop" in finishes  # with 2 EOG tokens of 512 some seed hits one within 64 tokens


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
