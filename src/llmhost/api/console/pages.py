"""The console's pages: login and logout, the overview (models, load/unload, live charts), the
audit log, usage and the playground (keys are in keys.py). Every page but the login needs a
session; every POST carries the session's CSRF token (the login form a token of its own, in a
short-lived cookie)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from llmhost.api.console.audit import AuditQuery, audit_page, verify_chain
from llmhost.api.console.charts import HEIGHT, WIDTH, charts
from llmhost.api.console.proxy import ProxiedResponse
from llmhost.api.console.sessions import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
)
from llmhost.api.console.usage import (
    CSV_ROWS,
    GROUPS,
    PAGE_ROWS,
    UsageQuery,
    today,
    usage_csv,
    usage_table,
)
from llmhost.errors import LlmhostError
from llmhost.security.auth import ANONYMOUS, Principal

if TYPE_CHECKING:  # app.py imports this module
    from llmhost.api.console.app import Console, ConsoleBase

log = logging.getLogger("llmhost.console")
MAX_FORM_BYTES = 8192  # a console form is a few short fields
MAX_KEY_CHARS = 4096  # an API key or a JWT
LOGIN_COOKIE_S = 600  # the login form's token lasts this long
CSRF_HEADER = "x-csrf-token"


class NeedLogin(Exception):
    """No live session: pages send the browser to the login form, scripts get 401."""


class Refused(Exception):
    """A request the console refuses with a page saying why (bad CSRF token, bad form)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def console_of(request: Request) -> Console:
    return cast("Console", request.app.state.console)


def base_of(request: Request) -> ConsoleBase:
    """What any console has (a server's or a router's): sessions, templates, cookie policy."""
    return cast("ConsoleBase", request.app.state.console)


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env = base_of(request).templates
    html = env.get_template(template).render(root=COOKIE_PATH, **context)
    return HTMLResponse(html, status_code=status)


def session_of(request: Request) -> Session:
    console = base_of(request)
    sid = request.cookies.get(SESSION_COOKIE)
    session = console.sessions.get(sid)
    if session is None:
        raise NeedLogin()
    if not console.still_valid(session.principal):  # its key was revoked, say
        console.sessions.end(sid)
        raise NeedLogin()
    return session


async def read_form(request: Request) -> dict[str, str]:
    """The form's fields (first value of each), from a body of at most `MAX_FORM_BYTES`."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, f"the form is larger than {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=16)
    return {k: v[0] for k, v in fields.items()}


async def checked_form(request: Request, session: Session) -> dict[str, str]:
    """The form of a POST from a page, once its CSRF token matches the session's."""
    form = await read_form(request)
    if not session.csrf_ok(form.get("csrf")):
        raise Refused(403, "the form's CSRF token is missing or wrong: reload the page")
    return form


def see_other(path: str) -> RedirectResponse:
    return RedirectResponse(COOKIE_PATH + path, status_code=303)


# --- login -----------------------------------------------------------------------------------


def login_form(request: Request, error: str | None = None, status: int = 200) -> HTMLResponse:
    console = console_of(request)
    return login_form_for(
        request,
        error,
        status,
        auth_on=console.api.state.authenticator is not None,
        sso_on=console.oidc is not None,
    )


def login_form_for(
    request: Request,
    error: str | None,
    status: int,
    *,
    auth_on: bool,
    sso_on: bool = False,
    key_label: str = "Admin API key",
) -> HTMLResponse:
    """The login page, with a fresh token for its form in a short-lived cookie."""
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        status,
        csrf=token,
        error=error,
        auth_on=auth_on,
        sso_on=sso_on,
        key_label=key_label,
        session=None,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_COOKIE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=base_of(request).secure_cookies,
    )
    return response


def login_token_ok(request: Request, form: dict[str, str]) -> bool:
    """Whether the login form came from the page we served (its token matches its cookie)."""
    expected = request.cookies.get(LOGIN_COOKIE)
    token = form.get("csrf")
    return bool(expected and token and secrets.compare_digest(expected, token))


async def login_page(request: Request) -> Response:
    if console_of(request).sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
        return see_other("")
    return login_form(request)


async def authenticate(request: Request, key: str) -> Principal:
    """The principal `key` names, as the API would authenticate it; failures count towards
    the client's limit on failed authentications, as the API's do."""
    api = console_of(request).api.state
    if api.authenticator is None:
        return ANONYMOUS
    client = request.client.host if request.client else "?"
    if api.limiter is not None:
        blocked = await api.limiter.auth_failures_exceeded(client)
        if blocked is not None:
            raise Refused(429, "too many failed logins from this address; retry in a minute")
    try:
        principal: Principal = api.authenticator.authenticate("Bearer " + key)
    except LlmhostError as exc:
        if api.metrics is not None:
            api.metrics.auth_failures.inc()
        if api.limiter is not None:
            await api.limiter.note_auth_failure(client)
        log.warning("console login failed from %s: %s", client[:64], exc.message[:200])
        raise
    return principal


async def login(request: Request) -> Response:
    form = await read_form(request)
    if not login_token_ok(request, form):
        return login_form(request, "The login form expired: try again.", 403)
    key = form.get("key", "").strip()
    auth_on = console_of(request).api.state.authenticator is not None
    if auth_on and not key:
        return login_form(request, "Enter an admin API key.", 400)
    if len(key) > MAX_KEY_CHARS:
        return login_form(request, "That is not an API key (too long).", 400)
    try:
        principal = await authenticate(request, key)
    except LlmhostError:
        return login_form(request, "That key is not valid (unknown, revoked or expired).", 401)
    if not principal.is_admin:
        return render(
            request,
            "error.html",
            403,
            title="Admins only",
            message="This key is valid but not an admin key: the console is for admins.",
            session=None,
        )
    return start_session(request, principal, see_other(""))


def start_session(request: Request, principal: Principal, response: Response) -> Response:
    """`response`, setting the cookie of a new session for `principal` (API key or SSO)."""
    console = base_of(request)
    console.sessions.end(request.cookies.get(SESSION_COOKIE))  # a new login, a new id
    sid, session = console.sessions.start(principal)
    log.info("console login: %s (%s)", principal.user_id, principal.via)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=max(1, int(session.expires - session.started)),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=console.secure_cookies,
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    return response


async def logout(request: Request) -> Response:
    session = session_of(request)
    await checked_form(request, session)
    base_of(request).sessions.end(request.cookies.get(SESSION_COOKIE))
    response = see_other("/login")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


# --- overview ---------------------------------------------------------------------------------


def live_context(request: Request) -> dict[str, Any]:
    console = console_of(request)
    sampler = console.sampler
    return {
        "models": console.api.state.pool.status(),
        "charts": charts(sampler.samples) if sampler is not None else None,
        "every": sampler.every if sampler is not None else None,
        "width": WIDTH,
        "height": HEIGHT,
    }


async def overview(request: Request) -> Response:
    session = session_of(request)
    flash, session.flash = session.flash, None
    return render(
        request,
        "overview.html",
        session=session,
        flash=flash,
        page="overview",
        **live_context(request),
    )


async def live(request: Request) -> Response:
    """The overview's models and charts alone, for the page's script to swap in."""
    session = session_of(request)
    return render(request, "live.html", session=session, **live_context(request))


def _finished(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("console load failed: %s", task.exception())


async def model_action(request: Request) -> Response:
    session = session_of(request)
    console = console_of(request)
    pool = console.api.state.pool
    model_id, action = request.path_params["model_id"], request.path_params["action"]
    if action not in ("load", "unload"):
        raise Refused(404, "a model can be loaded or unloaded")
    await checked_form(request, session)
    if not console.api.state.ready:  # as the admin endpoints: not while the pool starts
        session.flash = "The server is still starting: try again in a moment."
        return see_other("")
    try:
        entry = pool.entry(model_id)
    except LlmhostError as exc:
        session.flash = exc.message
        return see_other("")
    model_id = entry.spec.id
    if action == "load":
        # Loading may take minutes: it runs on while the page shows "loading", then "loaded"
        # or the pool's error.
        task = asyncio.create_task(pool.load(model_id))
        console.tasks.add(task)
        task.add_done_callback(console.tasks.discard)
        task.add_done_callback(_finished)
        session.flash = f"Loading {model_id}."
        log.info("console: %s loads %s", session.principal.user_id, model_id)
    elif await pool.unload(model_id):
        session.flash = f"Unloaded {model_id}."
        log.info("console: %s unloaded %s", session.principal.user_id, model_id)
    else:
        session.flash = f"{model_id} has requests in flight; unload it once they end."
    return see_other("")


# --- audit and playground ---------------------------------------------------------------------


async def audit(request: Request) -> Response:
    session = session_of(request)
    console = console_of(request)
    writer = console.api.state.audit
    query = AuditQuery.from_params(request.query_params)
    found = (
        await audit_page(writer.store, query)
        if writer is not None and query.error is None
        else None
    )
    return render(
        request,
        "audit.html",
        session=session,
        page="audit",
        audit_on=writer is not None,
        query=query,
        result=found,
        verify=console.verify,
    )


async def verify(request: Request) -> Response:
    session = session_of(request)
    await checked_form(request, session)
    console = console_of(request)
    writer = console.api.state.audit
    if writer is not None:
        await verify_chain(writer.store, console.verify, time.time)
    return see_other("/audit")


async def usage(request: Request) -> Response:
    session = session_of(request)
    recorder = console_of(request).api.state.usage
    context: dict[str, Any] = {"usage_on": recorder is not None, "groups": GROUPS}
    if recorder is not None:
        query = UsageQuery.from_params(request.query_params, today(recorder))
        table = await usage_table(recorder, query) if query.error is None else None
        context.update(
            since=query.since,
            until=query.until,
            group_by=query.group_by,
            error=query.error,
            rows=table.rows if table else [],
            total=table.total if table else None,
            group_count=table.groups if table else 0,
            truncated=bool(table and table.truncated),
            limit=PAGE_ROWS,
            csv_limit=CSV_ROWS,
        )
    return render(request, "usage.html", session=session, page="usage", **context)


async def usage_export(request: Request) -> Response:
    session_of(request)
    recorder = console_of(request).api.state.usage
    if recorder is None:
        raise Refused(404, "usage accounting is off on this server (usage = false)")
    query = UsageQuery.from_params(request.query_params, today(recorder))
    if query.error is not None:
        raise Refused(400, query.error)
    text = await usage_csv(recorder, query)
    name = f"llmhost-usage-{query.group_by}-{query.since}-{query.until}.csv"
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def playground(request: Request) -> Response:
    session = session_of(request)
    models = [m for m in console_of(request).api.state.pool.status() if m["kind"] == "chat"]
    return render(request, "playground.html", session=session, page="playground", models=models)


async def playground_chat(request: Request) -> Response:
    """The playground's chat completion, made in-process on the API for the session's admin:
    the session cookie stays with the console and no API credential goes to the page."""
    session = session_of(request)
    if not session.csrf_ok(request.headers.get(CSRF_HEADER)):
        raise Refused(403, "the request's CSRF token is missing or wrong: reload the page")
    body = await request.body()
    return ProxiedResponse(console_of(request).api, session.principal, body)


# --- errors and wiring -----------------------------------------------------------------------


async def need_login(request: Request, _exc: Exception) -> Response:
    wants_page = request.method == "GET" and request.url.path != COOKIE_PATH + "/live"
    response: Response
    if wants_page:
        response = see_other("/login")
    else:
        response = render(
            request,
            "error.html",
            401,
            title="Logged out",
            message="Your console session has ended: log in again.",
            session=None,
        )
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


async def refused(request: Request, exc: Exception) -> Response:
    err = cast(Refused, exc)
    return render(
        request, "error.html", err.status, title="Refused", message=err.message, session=None
    )


def install_pages(app: FastAPI) -> None:
    root = COOKIE_PATH
    get, post = ["GET"], ["POST"]
    app.add_api_route(root, overview, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/live", live, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/login", login_page, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/login", login, methods=post)
    app.add_api_route(root + "/models/{model_id:path}/{action:str}", model_action, methods=post)
    app.add_api_route(root + "/audit", audit, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/audit/verify", verify, methods=post)
    app.add_api_route(root + "/usage", usage, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/usage.csv", usage_export, methods=get)
    app.add_api_route(root + "/playground", playground, methods=get, response_class=HTMLResponse)
    app.add_api_route(root + "/playground/chat", playground_chat, methods=post)
    from llmhost.api.console.keys import install_keys  # they build on this module
    from llmhost.api.console.sso import install_sso

    install_keys(app)
    install_sso(app)
