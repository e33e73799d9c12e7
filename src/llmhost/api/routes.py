"""HTTP routes: OpenAI-compatible endpoints, the guide's /generate, health and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

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
from llmhost.api.serving import OpenAIServing
from llmhost.api.serving_responses import create_response
from llmhost.errors import EngineNotReady, ModelNotFound, NotFound, PermissionDenied
from llmhost.observability.metrics import CONTENT_TYPE

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in (
        (400, "Invalid request: a field names what is wrong"),
        (401, "No valid API key or JWT"),
        (403, "Not allowed for this key or token"),
        (404, "No such model or resource"),
        (413, "Request body over the server's limit"),
        (414, "URL over 8 KiB"),
        (429, "A rate limit was reached (Retry-After)"),
        (503, "The model is loading, overloaded or the server is shutting down"),
    )
}
router = APIRouter(responses=_ERRORS)

_STREAM_DOC = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}
}


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a thread hop per
# dependency per request.


async def serving(request: Request) -> OpenAIServing:
    """The serving object, once the engine is loaded; 503 with Retry-After before that."""
    state = request.app.state
    if not state.ready:
        raise EngineNotReady(
            "the model is still loading"
            if state.load_error is None
            else f"the model failed to load: {state.load_error}",
            retry_after=5,
        )
    return state.serving


async def request_id(request: Request) -> str:
    return request.state.request_id


async def require_admin(request: Request) -> None:
    principal = request.scope.get("state", {}).get("principal")
    if principal is None or not principal.is_admin:
        raise PermissionDenied("this endpoint is for admins (an admin API key or role claim)")


async def audit_notes(request: Request) -> dict[str, Any]:
    """Where the serving layer leaves what the audit record needs."""
    return request.scope.setdefault("state", {}).setdefault("audit", {})


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
    """Readiness: the model is loaded and the engine healthy."""
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    h = state.engine.health()
    body = {
        "status": "ready" if h.ok else "unhealthy",
        "model": state.engine.model_info.id,
        "engine": state.engine.name,
        "stats": h.stats,
        **({"detail": h.detail} if h.detail else {}),
    }
    return JSONResponse(body, status_code=200 if h.ok else 503)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(s: OpenAIServing = Depends(serving)) -> dict[str, Any]:
    return {"object": "list", "data": [s.model_card()]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
async def retrieve_model(model_id: str, s: OpenAIServing = Depends(serving)) -> dict[str, Any]:
    """One model (the openai SDK's `models.retrieve`); 404 for any other id."""
    if model_id != s.model_id:
        raise ModelNotFound(
            f"The model '{model_id}' does not exist; this server serves '{s.model_id}'.",
            param="model",
        )
    return s.model_card()


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses=_STREAM_DOC, tags=["openai"]
)
async def completions(
    body: CompletionRequest,
    s: OpenAIServing = Depends(serving),
    rid: str = Depends(request_id),
    notes: dict[str, Any] = Depends(audit_notes),
):
    return await s.completion(body, rid, notes)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_STREAM_DOC,
    tags=["openai"],
)
async def chat_completions(
    body: ChatCompletionRequest,
    s: OpenAIServing = Depends(serving),
    rid: str = Depends(request_id),
    notes: dict[str, Any] = Depends(audit_notes),
):
    return await s.chat(body, rid, notes)


@router.post("/v1/responses", response_model=ResponseObject, responses=_STREAM_DOC, tags=["openai"])
async def responses(
    body: ResponsesRequest,
    s: OpenAIServing = Depends(serving),
    rid: str = Depends(request_id),
    notes: dict[str, Any] = Depends(audit_notes),
):
    """OpenAI's Responses API, stateless: nothing is stored, so each request carries its
    whole conversation in `input` (previous_response_id is refused)."""
    return await create_response(s, body, rid, notes)


@router.post("/generate", response_model=GenerateResponse, tags=["simple"])
async def generate(
    body: GenerateRequest,
    s: OpenAIServing = Depends(serving),
    rid: str = Depends(request_id),
    notes: dict[str, Any] = Depends(audit_notes),
):
    """The deployment guide's interface: a prompt in, the generated text out."""
    return await s.generate(body, rid, notes)


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
