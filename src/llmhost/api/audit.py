"""One audit record per generation request, written when its response ends (last byte sent,
error, or client gone). The serving layer leaves what it knows (model, prompt, usage, length
of the text) in the request's `RequestRecord`; this middleware adds where, status and time.

The request path only captures the raw prompt (text or token ids); redaction, hashing and the
length cap run in the audit writer's thread (`PromptPolicy.prepare`), off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost.api.cors import is_preflight
from llmhost.api.record import Prompt, RequestRecord, request_record
from llmhost.audit.store import AuditRecord
from llmhost.audit.writer import AuditWriter
from llmhost.security.redact import Redactor

log = logging.getLogger("llmhost.audit")
PromptMode = Literal["redacted", "full", "hash", "none"]
AUDITED = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/generate",
    }
)
CLIENT_CLOSED = 499
DEFAULT_PROMPT_CHARS = 32768


def _truncated(text: str, dropped: int) -> str:
    return f"{text}…[truncated: {dropped} more characters]" if dropped else text


def _capped(text: str, max_chars: int) -> str:
    return _truncated(text[:max_chars], max(0, len(text) - max_chars))


def stored_prompt(
    prompt: Prompt | None,
    mode: PromptMode,
    redactor: Redactor,
    max_chars: int = DEFAULT_PROMPT_CHARS,
) -> str | None:
    """The prompt as the audit log keeps it. Text is redacted (or kept, or hashed) and cut at
    `max_chars` with the cut recorded; token ids are kept as ids (`token_ids:[1,2,3]`), never
    redacted, and cut the same way. Several prompts (a completion request's list) are kept
    as one text, one prompt per paragraph, or as one list of id lists."""
    if prompt is None or mode == "none":
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompt = "\n\n".join(prompt)  # type: ignore[arg-type]
    if isinstance(prompt, list):
        text = "token_ids:" + json.dumps(prompt, separators=(",", ":"))
        if mode == "hash":
            return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return _capped(text, max_chars)
    if mode == "hash":
        return "sha256:" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
    if mode == "full":
        return _capped(prompt, max_chars)
    done = redactor.run(prompt, limit=max_chars)
    return _truncated(done.text, done.truncated)


@dataclass(frozen=True)
class PendingRecord:
    """A record whose prompt is still raw: `PromptPolicy.prepare` finishes it."""

    record: AuditRecord
    raw_prompt: Prompt | None


@dataclass(frozen=True)
class PromptPolicy:
    mode: PromptMode = "redacted"
    redactor: Redactor = field(default_factory=Redactor)
    max_chars: int = DEFAULT_PROMPT_CHARS

    def prepare(self, item: PendingRecord | AuditRecord) -> AuditRecord:
        if isinstance(item, AuditRecord):
            return item
        prompt = stored_prompt(item.raw_prompt, self.mode, self.redactor, self.max_chars)
        return replace(item.record, prompt=prompt)


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
    """Submits exactly one record per audited request, whatever happens to the request. The
    requests in flight are tracked, so a shutdown can end them and still record them
    (`InFlight.finish`)."""

    def __init__(self, app: ASGIApp, writer: AuditWriter, tracker: InFlight | None = None):
        self.app = app
        self.writer = writer
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A CORS preflight that reached here (CORS off) asks nothing of the API: not a request
        # to audit, as the metrics do not count it; any other OPTIONS is (a 405).
        if scope["type"] != "http" or scope["path"] not in AUDITED or is_preflight(scope):
            await self.app(scope, receive, send)
            return
        t0 = time.time()
        rec = request_record(scope)
        outcome = ResponseOutcome(send)
        task = asyncio.current_task()
        if self.tracker is not None and task is not None:
            self.tracker.add(task)
        try:
            await self.app(scope, receive, outcome)
        finally:
            if self.tracker is not None and task is not None:
                self.tracker.discard(task)
            try:
                self._record(scope, rec, outcome.final_status, t0)
            except Exception:  # never let the audit trail break the client's connection
                log.exception("audit record of request %s not made", rec.request_id)
                self.writer.count_dropped(1)

    def _record(self, scope: Scope, rec: RequestRecord, status: int, t0: float) -> None:
        principal = rec.principal
        usage = rec.tokens()
        client = scope.get("client") or ("", 0)
        record = AuditRecord(
            ts=t0,
            request_id=rec.request_id,
            client_ip=str(client[0]),
            user_id=(principal.user_id if principal is not None else None) or "anonymous",
            route=scope["path"],
            status=rec.error_status or status,
            model=rec.model,
            prompt=None,
            response_length=rec.chars,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=(time.time() - t0) * 1000,
        )
        self.writer.submit(PendingRecord(record, rec.prompt))


class InFlight:
    """The tasks of audited requests still running, so a shutdown can cancel them (their
    records are then submitted by the middleware) before the audit writer closes."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)

    def discard(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)

    async def finish(self, timeout: float = 5.0) -> None:
        """Cancel what is still running and wait (bounded) for the records to be submitted."""
        pending = [t for t in self.tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout)
