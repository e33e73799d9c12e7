"""`POST /v1/rerank` (and `/rerank`): documents scored against a query by a cross-encoder, in
the shape llama-server, vLLM, Jina and Cohere accept (`query`, `documents`, `top_n`,
`return_documents`; results with `index` and `relevance_score`, best first)."""

from __future__ import annotations

from typing import Annotated, Any, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from llmhost.api.embeddings import Truncate
from llmhost.api.protocol import KeepAlive, PositiveInt
from llmhost.api.record import RequestRecord
from llmhost.api.serving import OpenAIServing, check_text
from llmhost.engines.embedding import RerankEngine
from llmhost.types import Usage

MAX_DOCUMENTS = 1000  # Cohere's limit per request


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1)


def _few_documents(v: Any) -> Any:
    # Counted before the items are checked, so 100,000 documents cost nothing.
    if isinstance(v, list) and len(v) > MAX_DOCUMENTS:
        raise ValueError(f"{len(v)} documents were sent; at most {MAX_DOCUMENTS} per request")
    return v


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id; defaults to the default model.")
    query: str = Field(..., min_length=1)
    documents: Annotated[
        list[Annotated[str, Field(min_length=1)] | TextDocument],
        BeforeValidator(_few_documents),
        Field(min_length=1, max_length=MAX_DOCUMENTS),
    ]
    top_n: PositiveInt | None = Field(None, description="Return the n best; default: all.")
    return_documents: StrictBool = Field(True, description="Include each document's text.")
    truncate_prompt_tokens: Truncate = None
    user: str | None = Field(None, description="Accepted and ignored.")
    keep_alive: KeepAlive = None

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


async def create_rerank(
    s: OpenAIServing, req: RerankRequest, request_id: str, record: RequestRecord
) -> dict[str, Any]:
    model = s.check_model(req.model)
    texts = req.texts
    check_text(req.query, "query")
    for i, t in enumerate(texts):
        check_text(t, f"documents[{i}]")
    record.model, record.prompt = model, req.query
    scores, tokens = await cast(RerankEngine, s.engine).rerank(
        req.query, texts, req.truncate_prompt_tokens
    )
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: req.top_n or len(texts)]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    record.usage = Usage(tokens, 0)
    return {
        "id": f"rerank-{request_id}",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
