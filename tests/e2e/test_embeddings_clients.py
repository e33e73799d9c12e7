"""A real `llmhost serve --demo` with a BERT embedding model and a BERT reranker declared beside
the demo chat model (config.toml), driven by the clients users bring: the openai SDK,
LangChain's OpenAIEmbeddings, litellm.embedding, and a small RAG loop (embed, rerank, chat)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import require
from tests.e2e.conftest import Server

openai = require("openai")

DOCS = [
    "The queue holds requests that wait for a free slot.",
    "TLS certificates are renewed by the operator every year.",
    "Each slot decodes one sequence at a time.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_embedder, tiny_reranker):
    home = tmp_path_factory.mktemp("embed-home")
    (home / "config.toml").write_text(
        f'[models.embed]\nsource = "{tiny_embedder.gguf}"\nkind = "embedding"\nparallel = 4\n'
        f'[models.rerank]\nsource = "{tiny_reranker.hf_dir}"\nengine = "transformers"\n'
        'kind = "rerank"\n'
    )
    srv = Server(home, "--demo", "--parallel", "4")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_openai_sdk(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kinds = {m.id: m.model_extra["kind"] for m in client.models.list().data}
    assert kinds == {"llmhost-demo": "chat", "embed": "embedding", "rerank": "rerank"}
    r = client.embeddings.create(model="embed", input=DOCS)  # the SDK asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape[0] == 3 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    floats = client.embeddings.create(model="embed", input=DOCS[0], encoding_format="float")
    # the same text alone or in a batch: equal up to float rounding of other batch shapes
    assert float(np.dot(floats.data[0].embedding, vecs[0])) > 0.9999
    assert r.usage.prompt_tokens > 10
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])


def test_langchain_openai_embeddings(server):
    require("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send text, not tiktoken ids (OpenAI's vocabulary)
    emb = OpenAIEmbeddings(
        model="embed",
        base_url=server.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    docs = emb.embed_documents(DOCS)
    query = emb.embed_query(DOCS[2])
    assert len(docs) == 3 and float(np.dot(docs[2], query)) > 0.9999


def test_litellm_embedding(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = require("litellm")
    r = litellm.embedding(
        model="openai/embed", api_base=server.url + "/v1", api_key="unused", input=DOCS[:2]
    )
    assert len(r.data) == 2 and len(r.data[0]["embedding"]) > 8


def test_a_small_rag_loop(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    docs = np.array([d.embedding for d in client.embeddings.create(model="embed", input=DOCS).data])
    question = DOCS[1]  # the models have random weights: ask with a document's own words
    q = np.array(client.embeddings.create(model="embed", input=question).data[0].embedding)
    candidates = [int(i) for i in np.argsort(-(docs @ q))[:2]]
    assert candidates[0] == 1
    ranked = httpx.post(
        server.url + "/v1/rerank",
        json={"model": "rerank", "query": question, "documents": [DOCS[i] for i in candidates]},
        timeout=60,
    ).json()["results"]
    assert sorted(r["index"] for r in ranked) == [0, 1]
    assert ranked[0]["relevance_score"] >= ranked[1]["relevance_score"]
    best = candidates[ranked[0]["index"]]
    answer = client.chat.completions.create(
        model="llmhost-demo",
        messages=[{"role": "user", "content": f"Context: {DOCS[best]}\nQuestion: {question}"}],
        max_tokens=8,
    )
    assert answer.choices[0].message.content is not None
