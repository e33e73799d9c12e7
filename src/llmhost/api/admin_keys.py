"""The admin endpoints for API keys, which the console's keys page also serves: list, create
(the secret in the answer is its only copy), revoke, and rotate with a grace period. Secrets
and digests are never listed; each change is an audit record of the admin who made it."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from llmhost.api.protocol import ErrorResponse
from llmhost.api.record import request_record
from llmhost.api.routes import require_admin
from llmhost.api.routes import router as api_router
from llmhost.audit.records import AuditRecord
from llmhost.durations import parse_duration
from llmhost.errors import ConfigError, Conflict, InvalidRequest, NotFound
from llmhost.security.auth import MAX_GRACE_SECONDS, MAX_KEY_MODELS, KeyInfo, KeyStore

router = APIRouter(responses=api_router.responses)

# --- API keys (admins only) ----------------------------------------------------------------


def _seconds(v: Any) -> float:
    """A JSON number of seconds or a duration string (`24h`, `30d`)."""
    if isinstance(v, bool) or not isinstance(v, int | float | str) or len(str(v)) > 32:
        raise ValueError("a number of seconds or a duration such as 24h or 30d")
    return parse_duration(v.strip() if isinstance(v, str) else v)


Seconds = Annotated[
    float,
    BeforeValidator(_seconds),
    WithJsonSchema(
        {"anyOf": [{"type": "number"}, {"type": "string", "maxLength": 32, "example": "24h"}]}
    ),
]
KeyId = Annotated[str, Path(max_length=64)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, max_length=128)
    role: Literal["user", "admin"] = "user"
    expires: Seconds | None = Field(
        None, gt=0, le=100 * 365 * 86400, description="Lifetime (30d); never if absent."
    )
    rpm: int | None = Field(None, ge=1, le=10**9)
    tpm: int | None = Field(None, ge=1, le=10**12)
    models: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None, min_length=1, max_length=MAX_KEY_MODELS, description="None: every model."
    )


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace: Seconds = Field(
        ge=0,
        le=MAX_GRACE_SECONDS,
        description="How long the old secret keeps working (24h); 0: it stops now.",
    )


def _keys(request: Request) -> KeyStore:
    authenticator = request.app.state.authenticator
    if authenticator is None or authenticator.keys is None:
        raise NotFound("API keys are off on this server (it runs without authentication)")
    keys: KeyStore = authenticator.keys
    return keys


def _key_card(info: KeyInfo) -> dict[str, Any]:
    """What a key is, never its secret or digest."""
    return {"object": "api_key", **vars(info), "state": info.state()}


def _audit_key_change(request: Request, t0: float) -> None:
    """A key made, revoked or rotated through the API goes into the audit log beside the
    requests: which admin, from where, when, and the route (which names the key, but for a
    creation)."""
    writer = request.app.state.audit
    if writer is None:
        return
    rec = request_record(request.scope)
    principal = rec.principal
    writer.submit(
        AuditRecord(
            ts=t0,
            request_id=rec.request_id,
            client_ip=request.client.host if request.client else "",
            user_id=principal.user_id if principal is not None else "anonymous",
            route=request.url.path,
            status=200,
            latency_ms=(time.time() - t0) * 1000,
        )
    )


async def _key_call(
    refusal: type[InvalidRequest | Conflict], call: Any, *args: Any, **kwargs: Any
) -> Any:
    """A key store call off the event loop. The store refuses with ConfigError (the CLI's
    exit code 2): here that is the client's error, bad input (400) or the key's state (409)."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except ConfigError as exc:
        raise refusal(exc.message) from None


@router.get("/v1/admin/keys", tags=["admin"], dependencies=[Depends(require_admin)])
async def admin_keys(request: Request) -> dict[str, Any]:
    """Every API key with its owner, role, limits, state and rotation (never a secret);
    admins only."""
    found = await asyncio.to_thread(_keys(request).list)
    return {"object": "list", "data": [_key_card(k) for k in found]}


@router.post("/v1/admin/keys", tags=["admin"], dependencies=[Depends(require_admin)])
async def admin_create_key(request: Request, body: KeyCreate) -> dict[str, Any]:
    """Create a key; `key` in the answer is the only copy of its secret; admins only."""
    t0 = time.time()
    text, info = await _key_call(
        InvalidRequest,
        _keys(request).create,
        body.user,
        body.role,
        expires_in=body.expires,
        rpm=body.rpm,
        tpm=body.tpm,
        models=body.models,
    )
    _audit_key_change(request, t0)
    return {**_key_card(info), "key": text}


_KEY_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "The key is revoked (or expired)"}
}


@router.post(
    "/v1/admin/keys/{key_id}/revoke",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=_KEY_CONFLICT,
)
async def admin_revoke_key(request: Request, key_id: KeyId) -> dict[str, Any]:
    """Revoke a key: its secrets stop working at once; 404 for an unknown id, 409 when it
    was revoked already; admins only."""
    t0 = time.time()
    info = await _key_call(Conflict, _keys(request).revoke, key_id)
    _audit_key_change(request, t0)
    return _key_card(info)


@router.post(
    "/v1/admin/keys/{key_id}/rotate",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=_KEY_CONFLICT,
)
async def admin_rotate_key(request: Request, key_id: KeyId, body: KeyRotate) -> dict[str, Any]:
    """A new secret for the key (`key`, its only copy); the old one works until
    `old_secret_until` (`grace` 0: it stops now), and one still in the grace of an earlier
    rotation stops at once (`cut_short`); 404 for an unknown id, 409 for a key revoked or
    expired; admins only."""
    t0 = time.time()
    done = await _key_call(Conflict, _keys(request).rotate, key_id, body.grace)
    _audit_key_change(request, t0)
    return {**_key_card(done.info), "key": done.key, "cut_short": done.cut_short}
