"""The console's sessions page: every live console login (who, how, since and until when) with
an End button each, so an admin can cut off a session at once (a lost laptop, someone who
left). Ending your own is logging out. A server's console and a router's share it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from llmhost.api.console.pages import base_of, checked_form, render, see_other, session_of
from llmhost.api.console.sessions import COOKIE_PATH, SESSION_COOKIE

log = logging.getLogger("llmhost.console")
MAX_HANDLE_CHARS = 64


async def sessions_page(request: Request) -> Response:
    session = session_of(request)
    flash, session.flash = session.flash, None
    return render(
        request,
        "sessions.html",
        session=session,
        page="sessions",
        flash=flash,
        live=base_of(request).sessions.live(),
    )


async def end_session(request: Request) -> Response:
    session = session_of(request)
    await checked_form(request, session)
    handle = request.path_params["handle"][:MAX_HANDLE_CHARS]
    ended = base_of(request).sessions.end_handle(handle)
    if ended is None:
        session.flash = "That session had already ended."
        return see_other("/sessions")
    who = ended.principal.user_id
    log.info("console: %s ended the session of %s", session.principal.user_id, who)
    if ended is session:
        response = see_other("/login")
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return response
    session.flash = f"Ended the session of {who}: its next request goes to the login page."
    return see_other("/sessions")


def install_sessions(app: FastAPI) -> None:
    root = COOKIE_PATH
    app.add_api_route(
        root + "/sessions", sessions_page, methods=["GET"], response_class=HTMLResponse
    )
    app.add_api_route(root + "/sessions/{handle}/end", end_session, methods=["POST"])
