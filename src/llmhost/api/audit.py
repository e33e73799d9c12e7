"""One audit record per generation request, written when its response ends (last byte sent,
error, or client gone). The serving layer leaves what it knows (model, prompt, usage, length
of the text) in the request's `audit` notes; this middleware adds who, where, status and time."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost.audit.store import AuditRecord
from llmhost.audit.writer import AuditWriter
from llmhost.security.redact import Redactor

PromptMode = Literal["redacted", "full", "hash", "none"]
AUDITED = frozenset({"/v1/completions", "/v1/chat/completions", "/generate"})
CLIENT_CLOSED = 499


def stored_prompt(text: str | None, mode: PromptMode, redactor: Redactor) -> str | None:
    if text is None or mode == "none":
        return None
    if mode == "full":
        return text
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return redactor.redact(text)


class ResponseOutcome:
    """Passes an app's messages on and remembers its status and whether the last byte of the
    body went out; a response cut short (client gone) counts as 499."""

    def __init__(self, send: Send):
        self.send = send
        self.status = 500
        self.done = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done = True

    @property
    def final_status(self) -> int:
        return CLIENT_CLOSED if not self.done and self.status < 400 else self.status


class AuditMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        writer: AuditWriter,
        prompt_mode: PromptMode = "redacted",
        redactor: Redactor | None = None,
    ):
        self.app = app
        self.writer = writer
        self.prompt_mode = prompt_mode
        self.redactor = redactor or Redactor()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in AUDITED:
            await self.app(scope, receive, send)
            return
        t0 = time.time()
        state = scope.setdefault("state", {})
        notes: dict[str, Any] = state.setdefault("audit", {})
        outcome = ResponseOutcome(send)
        try:
            await self.app(scope, receive, outcome)
        finally:
            self._record(scope, state, notes, outcome.final_status, t0)

    def _record(self, scope: Scope, state: dict, notes: dict, status: int, t0: float) -> None:
        principal = state.get("principal")
        usage = notes.get("usage") or {}
        client = scope.get("client") or ("", 0)
        self.writer.submit(
            AuditRecord(
                ts=t0,
                request_id=state.get("request_id", ""),
                client_ip=client[0],
                user_id=getattr(principal, "user_id", None) or "anonymous",
                route=scope["path"],
                status=status,
                model=notes.get("model", ""),
                prompt=stored_prompt(notes.get("prompt"), self.prompt_mode, self.redactor),
                response_length=notes.get("chars", 0),
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                latency_ms=(time.time() - t0) * 1000,
            )
        )
