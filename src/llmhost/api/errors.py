"""Maps every failure to an OpenAI-style error body with the right status; bad input never
becomes a 500."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from llmhost.errors import LlmhostError

log = logging.getLogger("llmhost.api")

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _describe(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return f"The request body is not valid JSON: {ctx}".rstrip(": "), None
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field: not supported here, so refused rather than ignored"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


async def llmhost_error_response(_: Request, exc: LlmhostError) -> JSONResponse:
    """An llmhost error as its OpenAI-style body and status (Retry-After when it has one)."""
    headers = {}
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry)))
    if exc.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)


def unexpected_error_handler(
    logger: logging.Logger, who: str
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The handler of any error nothing else caught: logged with its traceback, answered as
    a JSON 500 that points to `who`'s log."""

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body(f"internal server error; see the {who} log", "internal_error"),
            status_code=500,
        )

    return unexpected


def _allowed(request: Request) -> str:
    """Every method the API documents for the request's path: Starlette's 405 names only the
    methods of the first route that matched the path, and a path may have a route per method
    (GET and POST /v1/admin/keys). Empty for a path the schema leaves out."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {m.upper() for m in operations}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LlmhostError, llmhost_error_response)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(list(exc.errors()))
        return JSONResponse(
            error_body(message, "invalid_request_error", param=param), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(request) or headers.get("Allow", "")
        return JSONResponse(
            error_body(str(exc.detail), _HTTP_TYPES.get(exc.status_code, "invalid_request_error")),
            status_code=exc.status_code,
            headers=headers or None,
        )

    app.add_exception_handler(Exception, unexpected_error_handler(log, "server"))
