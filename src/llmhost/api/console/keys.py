"""The console's keys page: every API key with its owner, role, state, limits, model
allow-list, quotas and rotation; create (the secret shown once, on the next page), revoke,
and rotate with a grace period during which both secrets work. Each change is an audit
record of the admin who made it, as the admin key endpoints write."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from llmhost.api.console.pages import (
    Refused,
    checked_form,
    console_of,
    render,
    see_other,
    session_of,
)
from llmhost.api.console.sessions import COOKIE_PATH, Session
from llmhost.audit.records import AuditRecord
from llmhost.durations import parse_duration
from llmhost.errors import ConfigError, LlmhostError
from llmhost.security.auth import MAX_GRACE_SECONDS, KeyStore, Role
from llmhost.security.quota import MAX_QUOTA, Quota

MAX_LIFETIME_S = 100 * 365 * 86400.0
MAX_RATE = 10**12
PAGE_SIZE = 100  # keys a page shows; a server may hold tens of thousands
MAX_PAGE = 1000


def key_store(request: Request) -> KeyStore:
    authenticator = console_of(request).api.state.authenticator
    if authenticator is None or authenticator.keys is None:
        raise Refused(404, "API keys are off on this server (it runs without authentication)")
    keys: KeyStore = authenticator.keys
    return keys


def _whole(form: dict[str, str], name: str, low: int, high: int) -> int | None:
    text = form.get(name, "").strip()
    if not text:
        return None
    if len(text) > 20 or not text.isdigit() or not low <= int(text) <= high:
        raise ConfigError(f"{name.replace('_', ' ')} is a whole number from {low} to {high}")
    return int(text)


def _seconds(form: dict[str, str], name: str, high: float, what: str) -> float | None:
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        seconds = parse_duration(text[:32])
    except ValueError:
        raise ConfigError(f"{what} is a duration such as 24h or 30d") from None
    if not 0 <= seconds <= high:
        raise ConfigError(f"{what} is at most {high / 86400:.0f} days")
    return seconds


def created_key(store: KeyStore, form: dict[str, str]) -> str:
    """The key the create form asks for (ConfigError says what is wrong); its text is the
    only copy of its secret."""
    models = form.get("models", "").strip()
    quota = Quota(
        _whole(form, "tokens_per_day", 0, MAX_QUOTA),
        _whole(form, "tokens_per_month", 0, MAX_QUOTA),
        _whole(form, "requests_per_day", 0, MAX_QUOTA),
    )
    role = form.get("role", "user")
    if role not in ("user", "admin"):
        raise ConfigError("role is user or admin")
    text, _ = store.create(
        form.get("user", "").strip(),
        cast(Role, role),
        expires_in=_seconds(form, "expires", MAX_LIFETIME_S, "expires"),
        rpm=_whole(form, "rpm", 1, MAX_RATE),
        tpm=_whole(form, "tpm", 1, MAX_RATE),
        models=models.split(",")[:1024] if models else None,
        quota=quota,
    )
    return text


def audit_change(request: Request, session: Session, route: str, t0: float) -> None:
    writer = console_of(request).api.state.audit
    if writer is None:
        return
    writer.submit(
        AuditRecord(
            ts=t0,
            request_id="",
            client_ip=request.client.host if request.client else "",
            user_id=session.principal.user_id,
            route=route,
            status=200,
            latency_ms=(time.time() - t0) * 1000,
        )
    )


def _page_url(search: str, page: int) -> str:
    return "?" + urlencode({**({"q": search} if search else {}), "page": page})


async def keys_page(request: Request) -> Response:
    """A page of keys, newest first, optionally those of one user or key id (prefix)."""
    session = session_of(request)
    store = key_store(request)
    search = request.query_params.get("q", "").strip()[:128]
    page_text = request.query_params.get("page", "")[:4]
    page = min(max(int(page_text), 1), MAX_PAGE) if page_text.isdigit() else 1
    found = await asyncio.to_thread(
        store.page, search, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE
    )
    flash, session.flash = session.flash, None
    secret, session.secret = session.secret, None
    now = time.time()
    rows: list[dict[str, Any]] = [
        {"info": k, "state": k.state(now), "in_grace": k.in_grace(now)} for k in found[:PAGE_SIZE]
    ]
    more = len(found) > PAGE_SIZE and page < MAX_PAGE
    return render(
        request,
        "keys.html",
        session=session,
        page="keys",
        flash=flash,
        secret=secret,
        keys=rows,
        search=search,
        page_number=page,
        prev_url=_page_url(search, page - 1) if page > 1 else None,
        next_url=_page_url(search, page + 1) if more else None,
        max_grace_days=int(MAX_GRACE_SECONDS // 86400),
    )


async def key_create(request: Request) -> Response:
    session = session_of(request)
    form = await checked_form(request, session)
    store = key_store(request)
    t0 = time.time()
    try:
        session.secret = await asyncio.to_thread(created_key, store, form)
    except LlmhostError as exc:
        session.flash = f"No key made: {exc.message}"
        return see_other("/keys")
    audit_change(request, session, "/v1/admin/keys", t0)
    session.flash = "Key made. Copy its secret now: it is not shown again."
    return see_other("/keys")


async def key_action(request: Request) -> Response:
    session = session_of(request)
    form = await checked_form(request, session)
    store = key_store(request)
    key_id, action = request.path_params["key_id"][:64], request.path_params["action"]
    if action not in ("revoke", "rotate"):
        raise Refused(404, "a key can be revoked or rotated")
    t0 = time.time()
    try:
        if action == "revoke":
            await asyncio.to_thread(store.revoke, key_id)
            session.flash = f"Key {key_id} is revoked: its secrets stop working now."
        else:
            grace = _seconds(form, "grace", MAX_GRACE_SECONDS, "grace") or 0.0
            done = await asyncio.to_thread(store.rotate, key_id, grace)
            session.secret = done.key
            until = done.info.old_secret_until
            session.flash = (
                f"Key {key_id} has a new secret; the old one works until "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}."
                if until
                else f"Key {key_id} has a new secret; the old one stopped working."
            ) + (" An older secret still in its grace stopped at once." if done.cut_short else "")
    except LlmhostError as exc:
        session.flash = f"Key {key_id}: {exc.message}"
        return see_other("/keys")
    audit_change(request, session, f"/v1/admin/keys/{key_id}/{action}", t0)
    return see_other("/keys")


def install_keys(app: FastAPI) -> None:
    root = COOKIE_PATH
    app.add_api_route(root + "/keys", keys_page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route(root + "/keys", key_create, methods=["POST"])
    app.add_api_route(root + "/keys/{key_id}/{action}", key_action, methods=["POST"])
