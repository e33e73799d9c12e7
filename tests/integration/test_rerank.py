"""Reranking with a tiny BERT cross-encoder built in both formats from the same weights: the
llama.cpp and transformers engines give the same scores, and /v1/rerank (and /rerank) answer
in the shape llama-server, vLLM, Jina and Cohere clients read, with the 400s of bad input."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import open_settings, require

require("torch")
require("transformers")
require("llama_cpp")

from llmhost.api import create_app  # noqa: E402
from llmhost.engines.fake import FakeEngine  # noqa: E402
from llmhost.engines.llamacpp_embed import LlamaCppRerankEngine  # noqa: E402
from llmhost.engines.pool import ModelSpec, Pool  # noqa: E402
from llmhost.engines.transformers_embed import TransformersRerankEngine  # noqa: E402

QUERY = "which port does the server listen on"
DOCS = [
    "The server listens on port 8080.",
    "Slots decode together in one batch.",
    "The queue is full; retry later.",
    "TLS certificates are renewed every year.",
    "x",
]


def build(kind: str, model, **kw):
    kw = {"model_id": "rr", "threads": 2, "parallel": 4, **kw}
    if kind == "llamacpp":
        return LlamaCppRerankEngine(model.gguf, **kw)
    return TransformersRerankEngine(model.hf_dir, **kw)


async def test_both_engines_give_the_same_scores(tiny_reranker, start_engine):
    lc = await start_engine(build("llamacpp", tiny_reranker))
    tf = await start_engine(build("transformers", tiny_reranker))
    assert lc.kind == tf.kind == "rerank" and lc.pooling == "rank"
    assert lc.pair(QUERY, DOCS[0]) == tf.pair(QUERY, DOCS[0])
    (a, na), (b, nb) = await lc.rerank(QUERY, DOCS), await tf.rerank(QUERY, DOCS)
    assert na == nb > len(DOCS) * 3
    assert a == pytest.approx(b, abs=1e-4)
    assert all(0.0 < s < 1.0 for s in a) and len(set(a)) == len(a)
    alone = [(await lc.rerank(QUERY, [d]))[0][0] for d in DOCS]  # batched = one by one
    assert alone == pytest.approx(a, abs=1e-4)


async def test_a_model_without_a_rank_head_is_refused(tiny_embedder):
    engine = LlamaCppRerankEngine(tiny_embedder.gguf, threads=2)
    with pytest.raises(Exception, match="not a reranker"):
        await engine.start()
    await engine.close()


@pytest.fixture(params=["llamacpp", "transformers"])
async def api(request, tiny_reranker):
    pool = Pool(
        [
            ModelSpec(id="chat", build=lambda: FakeEngine(model_id="chat")),
            ModelSpec(
                id="rr",
                kind="rerank",
                build=lambda: build(request.param, tiny_reranker, ctx_size=64),
            ),
        ]
    )
    app = create_app(pool, open_settings())
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def test_results_best_first_with_top_n_and_documents(api):
    r = await api.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert all(x["document"]["text"] == DOCS[x["index"]] for x in results)
    assert body["usage"]["total_tokens"] > 0 and body["model"] == "rr"
    top = await api.post(
        "/rerank",
        json={
            "model": "rr",
            "query": QUERY,
            "documents": [{"text": d} for d in DOCS],
            "top_n": 2,
            "return_documents": False,
        },
    )
    assert [x["index"] for x in top.json()["results"]] == [x["index"] for x in results[:2]]
    assert "document" not in top.json()["results"][0]


@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"model": "rr", "query": QUERY, "documents": []}, 400, "documents", ""),
        ({"model": "rr", "query": "", "documents": ["a"]}, 400, "query", ""),
        ({"model": "rr", "query": QUERY, "documents": ["a", ""]}, 400, "documents", ""),
        ({"model": "rr", "query": QUERY, "documents": ["a"] * 10_000}, 400, "documents", "1000"),
        ({"model": "rr", "query": QUERY, "documents": ["w " * 200]}, 400, "documents", "at most"),
        ({"model": "rr", "query": QUERY, "documents": ["a"], "top_n": 0}, 400, "top_n", ""),
        ({"model": "chat", "query": QUERY, "documents": ["a"]}, 400, "model", "chat model"),
    ],
)
async def test_bad_input(api, body, status, param, fragment):
    r = await api.post("/v1/rerank", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    ok = await api.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": ["a"]})
    assert ok.status_code == 200


async def test_truncation_when_asked_cuts_the_document(api):
    body = {"model": "rr", "query": QUERY, "documents": ["w " * 200, "a"]}
    assert (await api.post("/v1/rerank", json=body)).status_code == 400
    r = await api.post("/v1/rerank", json={**body, "truncate_prompt_tokens": 20})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= 40
    r = await api.post("/v1/rerank", json={**body, "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text
    r = await api.post("/v1/rerank", json={**body, "truncate_prompt_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


async def test_other_routes_name_the_rerank_kind(api):
    r = await api.post("/v1/embeddings", json={"model": "rr", "input": "a"})
    assert r.status_code == 400 and "rerank model" in r.json()["error"]["message"]
    assert "/v1/rerank" in r.json()["error"]["message"]
