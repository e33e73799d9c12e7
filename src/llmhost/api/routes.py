"""HTTP routes: OpenAI-compatible endpoints, the guide's /generate, health and readiness."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from llmhost.api.embeddings import EmbeddingRequest, create_embeddings
from llmhost.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
)
from llmhost.api.protocol_responses import ResponseObject, ResponsesRequest
from llmhost.api.record import RequestRecord, request_record
from llmhost.api.rerank import RerankRequest, create_rerank
from llmhost.api.security import admit_quota
from llmhost.api.serving import OpenAIServing
from llmhost.api.serving_responses import create_response
from llmhost.errors import (
    Conflict,
    EngineNotReady,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from llmhost.observability.metrics import CONTENT_TYPE
from llmhost.security.usage import GroupBy, day_range, to_csv, to_json, utc_day

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in (
        (400, "Invalid request: a field names what is wrong"),
        (401, "No valid API key or JWT"),
        (403, "Not allowed for this key or token"),
        (404, "No such model or resource"),
        (413, "Request body over the server's limit"),
        (414, "URL over 8 KiB"),
        (429, "A rate limit or quota was reached (Retry-After)"),
        (503, "The model is loading, overloaded or the server is shutting down"),
    )
}
router = APIRouter(responses=_ERRORS)

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}
}


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a thread hop per
# dependency per request.


async def _ready(request: Request) -> None:
    state = request.app.state
    if not state.ready:
        raise EngineNotReady(
            "the model is still loading"
            if state.load_error is None
            else f"the model failed to load: {state.load_error}",
            retry_after=5,
        )


KIND_ROUTES = {
    "chat": "/v1/chat/completions",
    "embedding": "/v1/embeddings",
    "rerank": "/v1/rerank",
}


async def serving_for(
    request: Request, model: str | None, keep_alive: float | None = None, kind: str = "chat"
) -> OpenAIServing:
    """The serving object of the requested model under a lease, which LeaseMiddleware
    releases when the response is over; loads the model first if it is not loaded."""
    await _ready(request)
    state = request.app.state
    pool = state.pool
    # One model: every name reaches it, and its serving names the model it serves in a 404.
    entry = pool.entry(None if pool.is_single else model)
    model_id = entry.spec.id
    if entry.spec.kind != kind:
        have = entry.spec.kind
        raise InvalidRequest(
            f"the model '{model_id}' is a{'n' if have[0] in 'ae' else ''} {have} model; "
            f"send it to {KIND_ROUTES.get(have, have)}",
            param="model",
        )
    principal = request_record(request.scope).principal
    if principal is not None and not principal.allows(model_id):
        raise PermissionDenied(
            f"this key or token may not use the model '{model_id}'; it may use: "
            + ", ".join(principal.models or ()),
        )
    if entry.spec.rpm and state.limiter is not None:
        decision = await state.limiter.admit_model(model_id, entry.spec.rpm)
        if not decision.allowed:
            if state.metrics is not None:
                state.metrics.rate_limited.labels("model").inc()
            raise RateLimited(
                f"rate limit reached ({decision.reason}); retry later",
                retry_after=max(1.0, decision.reset_after),
            )
    rec = request_record(request.scope)
    await admit_quota(state, rec, model_id, entry.spec.quota)
    try:
        await pool.acquire(model_id, keep_alive)
    except BaseException:  # never ran (load failed, bad keep_alive, client gone): not counted
        if rec.quota is not None and state.quotas is not None:
            await state.quotas.refund(rec.quota)
            rec.quota = None
        raise
    rec.leases.append(model_id)
    rec.served_model, rec.served_at = model_id, time.time()
    serving: OpenAIServing = state.servings[model_id]
    return serving


async def serving(request: Request) -> OpenAIServing:
    """The default model's serving (for routes that name no model)."""
    return await serving_for(request, None)


async def request_id(request: Request) -> str:
    return request_record(request.scope).request_id


async def require_admin(request: Request) -> None:
    principal = request_record(request.scope).principal
    if principal is None or not principal.is_admin:
        raise PermissionDenied("this endpoint is for admins (an admin API key or role claim)")


async def record(request: Request) -> RequestRecord:
    """Where the serving layer leaves what the audit, limits and metrics need."""
    return request_record(request.scope)


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (public unless `metrics_auth` is set)."""
    state = request.app.state
    if not state.metrics_here:
        raise NotFound("metrics are off on this port")
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/ready", tags=["ops"])
async def ready(request: Request) -> JSONResponse:
    """Readiness: the models to keep loaded are loaded and the default model's engine is
    healthy (with several models: each model's state, loaded on demand)."""
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    pool = state.pool
    body: dict[str, Any] = {"status": "ready"}
    engine = pool.loaded(pool.default_id)
    ok = True
    if engine is not None:
        h = engine.health()
        ok = h.ok
        body.update(
            status="ready" if h.ok else "unhealthy",
            model=engine.model_info.id,
            engine=engine.name,
            stats=h.stats,
            **({"detail": h.detail} if h.detail else {}),
        )
    if not pool.is_single:
        body["models"] = [
            {k: m[k] for k in ("id", "kind", "state", "in_flight")} for m in pool.status()
        ]
    return JSONResponse(body, status_code=200 if ok else 503)


def _cards(request: Request) -> list[dict[str, Any]]:
    """Every servable model: loaded ones as their serving describes them, the others with
    what is known before loading; `state` and `kind` say which."""
    state = request.app.state
    pool = state.pool
    principal = request_record(request.scope).principal
    out = []
    for m in pool.status():
        if principal is not None and not principal.allows(m["id"]):
            continue  # a key limited to some models sees only those
        serving = state.servings.get(m["id"])
        if serving is not None:
            card = serving.model_card()
            card["id"] = m["id"] if not pool.is_single else card["id"]
        else:
            card = {
                "id": m["id"],
                "object": "model",
                "created": state.created,
                "owned_by": "llmhost",
                "context_length": None,
            }
        out.append({**card, "state": m["state"], "kind": m["kind"]})
    return out


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request) -> dict[str, Any]:
    await _ready(request)
    return {"object": "list", "data": _cards(request)}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
async def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
    """One model (the openai SDK's `models.retrieve`); 404 for any other id."""
    await _ready(request)
    for card in _cards(request):
        if card["id"] == model_id:
            return card
    ids = ", ".join(sorted(c["id"] for c in _cards(request)))
    raise ModelNotFound(
        f"The model '{model_id}' does not exist; this server serves: {ids}.", param="model"
    )


@router.get("/v1/admin/models", tags=["admin"], dependencies=[Depends(require_admin)])
async def admin_models(request: Request) -> dict[str, Any]:
    """Every model with its state, memory estimate, requests in flight and keep-alive
    (`llmhost models ps`); admins only."""
    await _ready(request)
    pool = request.app.state.pool
    return {
        "object": "list",
        "data": pool.status(),
        "memory_budget_bytes": pool.budget_bytes,
        "memory_used_bytes": pool.used_bytes(),
        "gpu_memory_budget_bytes": {str(i): n for i, n in pool.gpu_budget.items()},
        "gpu_memory_used_bytes": {str(i): n for i, n in pool.gpu_used_bytes().items()},
    }


@router.post(
    "/v1/admin/models/{model_id:path}/load", tags=["admin"], dependencies=[Depends(require_admin)]
)
async def admin_load(request: Request, model_id: str) -> dict[str, Any]:
    """Load a model now (it stays for its keep-alive); admins only."""
    await _ready(request)
    pool = request.app.state.pool
    await pool.load(model_id)
    return next(m for m in pool.status() if m["id"] == pool.entry(model_id).spec.id)


@router.post(
    "/v1/admin/models/{model_id:path}/unload", tags=["admin"], dependencies=[Depends(require_admin)]
)
async def admin_unload(request: Request, model_id: str) -> dict[str, Any]:
    """Unload a model now; 409 while it has requests in flight; admins only."""
    await _ready(request)
    pool = request.app.state.pool
    if not await pool.unload(model_id):
        raise Conflict(f"the model '{model_id}' has requests in flight; retry once they end")
    return next(m for m in pool.status() if m["id"] == pool.entry(model_id).spec.id)


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses=_STREAM_DOC, tags=["openai"]
)
async def completions(
    request: Request,
    body: CompletionRequest,
    rid: str = Depends(request_id),
    rec: RequestRecord = Depends(record),
) -> dict[str, Any] | Response:
    s = await serving_for(request, body.model, body.keep_alive)
    return await s.completion(body, rid, rec)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_STREAM_DOC,
    tags=["openai"],
)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    rid: str = Depends(request_id),
    rec: RequestRecord = Depends(record),
) -> dict[str, Any] | Response:
    s = await serving_for(request, body.model, body.keep_alive)
    return await s.chat(body, rid, rec)


@router.post("/v1/responses", response_model=ResponseObject, responses=_STREAM_DOC, tags=["openai"])
async def responses(
    request: Request,
    body: ResponsesRequest,
    rid: str = Depends(request_id),
    rec: RequestRecord = Depends(record),
) -> dict[str, Any] | Response:
    """OpenAI's Responses API, stateless: nothing is stored, so each request carries its
    whole conversation in `input` (previous_response_id is refused)."""
    s = await serving_for(request, body.model, body.keep_alive)
    return await create_response(s, body, rid, rec)


@router.post("/v1/embeddings", tags=["openai"])
async def embeddings(
    request: Request,
    body: EmbeddingRequest,
    rec: RequestRecord = Depends(record),
) -> dict[str, Any]:
    """Vectors of texts or token ids from an embedding model (L2-normalised)."""
    s = await serving_for(request, body.model, body.keep_alive, kind="embedding")
    return await create_embeddings(s, body, rec)


@router.post("/v1/rerank", tags=["openai"])
@router.post("/rerank", tags=["openai"], include_in_schema=False)
async def rerank(
    request: Request,
    body: RerankRequest,
    rid: str = Depends(request_id),
    rec: RequestRecord = Depends(record),
) -> dict[str, Any]:
    """Documents scored against a query by a reranker (relevance 0..1, best first)."""
    s = await serving_for(request, body.model, body.keep_alive, kind="rerank")
    return await create_rerank(s, body, rid, rec)


@router.post("/generate", response_model=GenerateResponse, tags=["simple"])
async def generate(
    request: Request,
    body: GenerateRequest,
    rid: str = Depends(request_id),
    rec: RequestRecord = Depends(record),
) -> dict[str, Any]:
    """The deployment guide's interface: a prompt in, the generated text out."""
    s = await serving_for(request, None)
    return await s.generate(body, rid, rec)


@router.get("/v1/admin/audit", tags=["admin"], dependencies=[Depends(require_admin)])
async def admin_audit(
    request: Request,
    user: str | None = Query(None, max_length=128),
    since: float | None = Query(None, ge=0, le=1e11, description="Unix seconds."),
    until: float | None = Query(None, ge=0, le=1e11, description="Unix seconds."),
    model: str | None = Query(None, max_length=256),
    status: int | None = Query(None, ge=100, le=599),
    limit: int = Query(100, ge=1, le=10000),
) -> dict[str, Any]:
    """Audit records by user, time (Unix seconds), model or status; admins only."""
    writer = request.app.state.audit
    if writer is None:
        raise NotFound("the audit log is off on this server")
    found = await asyncio.to_thread(
        writer.store.search,
        user=user,
        since=since,
        until=until,
        model=model,
        status=status,
        limit=limit,
    )
    return {"object": "list", "data": [vars(r) for r in found]}


@router.get(
    "/v1/admin/usage",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    response_model=None,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
async def admin_usage(
    request: Request,
    since: str | None = Query(None, max_length=10, description="First UTC day, YYYY-MM-DD."),
    until: str | None = Query(None, max_length=10, description="Last UTC day (included)."),
    group_by: GroupBy = Query("day", description="key, user, model or day."),
    format: Literal["json", "csv"] = Query("json"),
    limit: int = Query(10_000, ge=1, le=100_000, description="Most rows."),
) -> Response:
    """Requests and tokens per key, user, model or UTC day over at most 366 days (by default
    the last 30); admins only. Requests refused by a limit or quota are not counted."""
    usage = request.app.state.usage
    if usage is None:
        raise NotFound("usage accounting is off on this server (usage = false)")
    first, last = day_range(since, until, utc_day(usage.clock()))
    rows = await usage.query(first, last, group_by, limit)
    # Up to 100,000 rows: rendered in a thread, not on the event loop.
    if format == "csv":
        text = await asyncio.to_thread(to_csv, rows, group_by)
        return Response(text, media_type="text/csv; charset=utf-8")
    text = await asyncio.to_thread(to_json, rows, group_by, first, last)
    return Response(text, media_type="application/json")
