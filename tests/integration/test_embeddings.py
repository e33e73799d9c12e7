"""Embeddings from the tiny real GGUF through llama.cpp: unit vectors that match a direct
computation (the Hugging Face model of the same weights, mean-pooled and normalised),
concurrent requests batched with the same results, and /v1/embeddings with every input form,
base64, dimensions and the 400s of bad input; a chat model and an embedding model each refuse
the other's route by name."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import open_settings, require

torch = require("torch")
require("transformers")
require("llama_cpp")

from transformers import AutoModel  # noqa: E402

from llmhost.api import create_app  # noqa: E402
from llmhost.engines.fake import FakeEngine  # noqa: E402
from llmhost.engines.llamacpp_embed import LlamaCppEmbeddingEngine  # noqa: E402
from llmhost.engines.pool import ModelSpec, Pool  # noqa: E402
from llmhost.engines.transformers_embed import TransformersEmbeddingEngine  # noqa: E402

TEXTS = ["The queue is full.", "Which port does the server use?", "slots", "x " * 60]


def build(kind: str, tiny_model, path=None, **kw):
    kw = {"model_id": "embed", "threads": 2, "parallel": 4, **kw}
    if kind == "llamacpp":
        return LlamaCppEmbeddingEngine(path or tiny_model.gguf, **kw)
    return TransformersEmbeddingEngine(path or tiny_model.hf_dir, **kw)


@pytest.fixture(params=["llamacpp", "transformers"])
async def engine(request, tiny_model, start_engine):
    return await start_engine(build(request.param, tiny_model))


async def test_both_engines_give_the_same_vectors(tiny_model, start_engine):
    lc = await start_engine(build("llamacpp", tiny_model))
    tf = await start_engine(build("transformers", tiny_model))
    ids = [lc.tokenize(t) for t in TEXTS]
    assert ids == [tf.tokenize(t) for t in TEXTS]
    for a, b in zip(await lc.embed(ids), await tf.embed(ids), strict=True):
        assert float(a @ b) > 0.999


async def test_a_bert_embedder_gives_the_same_vectors_in_both_formats(tiny_embedder, start_engine):
    lc = await start_engine(build("llamacpp", tiny_embedder))
    tf = await start_engine(build("transformers", tiny_embedder))
    assert (lc.pooling, tf.pooling) == ("mean", "mean")  # the GGUF's and the modules.json's
    ids = [lc.tokenize(t) for t in TEXTS]
    assert ids == [tf.tokenize(t) for t in TEXTS]  # llama.cpp's WordPiece = BERT's
    for a, b in zip(await lc.embed(ids), await tf.embed(ids), strict=True):
        assert float(np.linalg.norm(b)) == pytest.approx(1.0, abs=1e-5)  # its Normalize
        assert float(a @ b) > 0.9999


async def test_a_sentence_transformers_folder_declares_its_pooling(
    tiny_model, tmp_path, start_engine
):
    folder = tmp_path / "st"
    shutil.copytree(tiny_model.hf_dir, folder)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    engine = await start_engine(build("transformers", tiny_model, folder))
    assert engine.pooling == "cls"
    ids = engine.tokenize(TEXTS[0])
    (vec,) = await engine.embed([ids])
    model = AutoModel.from_pretrained(tiny_model.hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = model(torch.tensor([ids])).last_hidden_state[0, 0].double().numpy()
    assert np.allclose(vec, want, atol=2e-3)  # no Normalize module: the raw CLS vector
    assert abs(float(np.linalg.norm(vec)) - 1.0) > 1e-3


async def test_vectors_match_the_model_mean_pooled_and_normalised(engine, tiny_model):
    ids = [engine.tokenize(t) for t in TEXTS]
    got = await engine.embed(ids)
    assert engine.pooling == "mean" and engine.dimensions == got[0].shape[0]
    assert engine.kind == "embedding" and engine.health().ok
    model = AutoModel.from_pretrained(tiny_model.hf_dir, dtype=torch.float32).eval()
    for tokens, vec in zip(ids, got, strict=True):
        with torch.inference_mode():
            hidden = model(torch.tensor([tokens])).last_hidden_state[0].double().numpy()
        want = hidden.mean(0)
        want /= np.linalg.norm(want)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
        assert float(vec @ want) > 0.999


async def test_concurrent_requests_are_batched_with_the_same_vectors(engine):
    ids = [engine.tokenize(t) for t in TEXTS]
    together = await engine.embed(ids)
    apart = await asyncio.gather(*(engine.embed([i]) for i in ids))
    for a, (b,) in zip(together, apart, strict=True):
        assert float(a @ b) > 0.99999
    many = await engine.embed(ids * 5)  # more inputs than one batch holds
    assert len(many) == 20 and float(many[17] @ together[1]) > 0.99999


@pytest.mark.parametrize("kind", ["llamacpp", "transformers"])
async def test_truncation_when_asked_keeps_the_closing_token(kind, tiny_embedder, start_engine):
    engine = await start_engine(build(kind, tiny_embedder, ctx_size=32))
    sep = engine.special_suffix()
    assert len(sep) == 1 and engine.tokenize("a b c")[-1] == sep[0]  # BERT's [SEP]
    ids = engine.tokenize("word " * 100)
    assert len(ids) > 32
    with pytest.raises(Exception, match="at most 32"):
        await engine.embed([ids])  # refused unless truncation is asked for
    (cut,) = engine.truncate([ids], 10)
    assert cut == ids[:9] + sep and engine.truncate([ids[:5]], 10) == [ids[:5]]
    assert engine.truncate([ids], -1)[0] == ids[:31] + sep
    assert engine.truncate([[7] * 40], 10) == [[7] * 10]  # no closing token to keep
    with pytest.raises(Exception, match="at most 32"):
        engine.truncate([ids], 33)
    (a,), (b,) = await engine.embed([cut]), await engine.embed([ids[:9] + sep])
    assert float(a @ b) > 0.99999


async def test_truncate_prompt_tokens_through_the_api(api):
    long = "word " * 500
    r = await api.post(
        "/v1/embeddings",
        json={"model": "embed", "input": [long, "a"], "truncate_prompt_tokens": 16},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= 16 + 3  # what was embedded is what is counted
    whole = await api.post(
        "/v1/embeddings", json={"model": "embed", "input": long, "truncate_prompt_tokens": -1}
    )
    assert whole.status_code == 200 and whole.json()["usage"]["prompt_tokens"] == 64
    for bad, fragment in ((0, "-1"), (-2, "-1"), (65, "at most 64"), (True, "boolean")):
        r = await api.post(
            "/v1/embeddings", json={"model": "embed", "input": "a", "truncate_prompt_tokens": bad}
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == "truncate_prompt_tokens"
        assert fragment in r.json()["error"]["message"], r.text


@pytest.fixture
async def api(tiny_model):
    pool = Pool(
        [
            ModelSpec(id="chat", build=lambda: FakeEngine(model_id="chat")),
            ModelSpec(
                id="embed",
                kind="embedding",
                build=lambda: LlamaCppEmbeddingEngine(
                    tiny_model.gguf, model_id="embed", threads=2, parallel=4, ctx_size=64
                ),
            ),
        ]
    )
    app = create_app(pool, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def test_input_forms_base64_and_dimensions(api):
    r = await api.post("/v1/embeddings", json={"model": "embed", "input": TEXTS[:3]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["model"] == "embed"
    full = np.array(body["data"][1]["embedding"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3
    one = (await api.post("/v1/embeddings", json={"model": "embed", "input": TEXTS[1]})).json()
    assert float(np.dot(one["data"][0]["embedding"], full)) > 0.9999  # alone vs in a batch
    alone = np.array(one["data"][0]["embedding"])  # the same batch shape as below: equal
    b64 = await api.post(
        "/v1/embeddings",
        json={"model": "embed", "input": TEXTS[1], "encoding_format": "base64"},
    )
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")
    assert np.allclose(decoded, alone, atol=1e-6)
    short = await api.post(
        "/v1/embeddings", json={"model": "embed", "input": TEXTS[1], "dimensions": 8}
    )
    vec = np.array(short.json()["data"][0]["embedding"])
    assert vec.shape == (8,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(vec, alone[:8] / np.linalg.norm(alone[:8]), atol=1e-5)
    ids = await api.post("/v1/embeddings", json={"model": "embed", "input": [[5, 6, 7], [8]]})
    assert len(ids.json()["data"]) == 2 and ids.json()["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"model": "embed", "input": ""}, 400, "input", "empty"),
        ({"model": "embed", "input": ["a", ""]}, 400, "input", "empty"),
        ({"model": "embed", "input": ["a"] * 10_000}, 400, "input", "at most 2048"),
        ({"model": "embed", "input": "a", "dimensions": 100_000}, 400, "dimensions", "have"),
        ({"model": "embed", "input": [[10**7]]}, 400, "input", "vocabulary"),
        ({"model": "embed", "input": "word " * 500}, 400, "input", "at most 64"),
        ({"model": "embed", "input": "a", "encoding_format": "hex"}, 400, "encoding_format", ""),
        ({"model": "chat", "input": "a"}, 400, "model", "chat model"),
        ({"model": "nope", "input": "a"}, 404, "model", "chat, embed"),
    ],
)
async def test_bad_input(api, body, status, param, fragment):
    r = await api.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert (
        await api.post("/v1/embeddings", json={"model": "embed", "input": "ok"})
    ).status_code == 200


async def test_a_chat_request_to_an_embedding_model_is_refused(api):
    r = await api.post(
        "/v1/chat/completions",
        json={"model": "embed", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "embedding model" in r.json()["error"]["message"] and "/v1/embeddings" in r.text
    models = {m["id"]: m["kind"] for m in (await api.get("/v1/models")).json()["data"]}
    assert models == {"chat": "chat", "embed": "embedding"}
