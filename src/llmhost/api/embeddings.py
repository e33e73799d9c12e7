"""`POST /v1/embeddings`: the request and response as OpenAI shapes them, and the serving
logic (tokenize off the event loop, check against the model, embed, shorten to `dimensions`,
encode as floats or base64)."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict

from llmhost.api.protocol import JsonInt, KeepAlive
from llmhost.api.record import RequestRecord
from llmhost.api.serving import OpenAIServing, check_text
from llmhost.engines.embedding import THREAD_CHARS, EmbeddingEngine
from llmhost.errors import InvalidRequest
from llmhost.types import Usage

MAX_INPUTS = 2048  # OpenAI's limit per request


def _few_inputs(v: Any) -> Any:
    # Counted before the items are checked, so 100,000 inputs cost nothing.
    if isinstance(v, list) and len(v) > MAX_INPUTS:
        raise ValueError(f"{len(v)} inputs were sent; at most {MAX_INPUTS} per request")
    return v


def _truncate(v: int | None) -> int | None:
    if v is not None and (v == 0 or v < -1):
        raise ValueError("a number of tokens, or -1 for the model's limit")
    return v


Truncate = Annotated[
    JsonInt | None,
    AfterValidator(_truncate),
    Field(
        description="Cut each input to its first n tokens (-1: the model's limit) instead of "
        "refusing one that is too long; closing special tokens are kept."
    ),
]


_IDS: JsonDict = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id; defaults to the default model.")
    input: Annotated[
        str | list[str] | list[JsonInt] | list[list[JsonInt]], BeforeValidator(_few_inputs)
    ] = Field(
        ...,
        description=f"Text, token ids, or a list of up to {MAX_INPUTS} of either.",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                },
                _IDS,
                {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_INPUTS},
            ]
        },
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: JsonInt | None = Field(
        None, ge=1, description="Keep the first n dimensions (renormalised)."
    )
    truncate_prompt_tokens: Truncate = None
    user: str | None = Field(None, description="Accepted and ignored.")
    keep_alive: KeepAlive = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        items = v if isinstance(v, list) and v and not isinstance(v[0], int) else [v]
        for i, item in enumerate(items):
            if isinstance(item, str | list) and not item:
                raise ValueError(f"input[{i}] is empty")
            if isinstance(item, list) and min(item) < 0:
                raise ValueError(f"input[{i}] has a negative token id")
        if isinstance(v, list) and v and isinstance(v[0], int) and min(v) < 0:
            raise ValueError("token ids must be non-negative")
        return v

    @property
    def inputs(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)  # type: ignore[arg-type]


async def _tokenize(
    s: OpenAIServing, inputs: list[str | list[int]], keep: int | None
) -> list[list[int]]:
    texts = [t for t in inputs if isinstance(t, str)]
    for i, t in enumerate(inputs):
        if isinstance(t, str):
            check_text(t, "input" if len(inputs) == 1 else f"input[{i}]")

    def run() -> list[list[int]]:
        engine = cast(EmbeddingEngine, s.engine)  # the route let only embedding models in
        ids = [s.engine.tokenize(t) if isinstance(t, str) else list(t) for t in inputs]
        return engine.truncate(ids, keep)

    if sum(len(t) for t in texts) > THREAD_CHARS or (keep is not None and len(inputs) > 64):
        return await asyncio.to_thread(run)
    return run()


def _encode(vec: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    out: list[float] = vec.tolist()
    return out


async def create_embeddings(
    s: OpenAIServing, req: EmbeddingRequest, record: RequestRecord
) -> dict[str, Any]:
    model = s.check_model(req.model)
    inputs = req.inputs
    record.model, record.prompt = model, [t for t in inputs if isinstance(t, str)] or None
    size = getattr(s.engine, "dimensions", None)
    if req.dimensions is not None and size is not None and req.dimensions > size:
        raise InvalidRequest(
            f"dimensions is {req.dimensions}; this model's embeddings have {size}",
            param="dimensions",
        )
    ids = await _tokenize(s, inputs, req.truncate_prompt_tokens)
    vectors = await s.engine.embed(ids)
    n = sum(len(t) for t in ids)
    data = []
    for i, vec in enumerate(vectors):
        if req.dimensions is not None:
            vec = vec[: req.dimensions]
            norm = float(np.linalg.norm(vec))
            vec = vec / norm if norm > 0 else vec
        data.append(
            {"object": "embedding", "index": i, "embedding": _encode(vec, req.encoding_format)}
        )
    usage = {"prompt_tokens": n, "total_tokens": n}
    record.usage = Usage(n, 0)
    return {"object": "list", "data": data, "model": model, "usage": usage}
