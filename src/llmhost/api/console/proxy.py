"""The playground's chat completion: the console calls the API app in-process (its whole edge,
so the request is rate-limited, audited and measured like any other) for the admin logged
in, and streams the API's answer straight back to the page. The API sees the principal the
console vouches for, never the session cookie.

The answer's tokens are timed here, as the API hands them over, and the times are sent to
the page in one last event (`event: timing`): a browser reading a fast model's stream gets
many tokens in one read and could not time them itself."""

from __future__ import annotations

import json
import time

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from llmhost.api.bodies import replaying
from llmhost.api.security import TRUSTED_PRINCIPAL
from llmhost.security.auth import Principal

CHAT_PATH = "/v1/chat/completions"
# The API's response headers the page may see; the rest (its CORS, say) stay behind.
PASSED_HEADERS = frozenset(
    {
        b"content-type",
        b"content-length",
        b"x-request-id",
        b"retry-after",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
    }
)


class StreamTimer:
    """When the first and the last generated piece of an SSE stream went by, seen from the
    events of its body as they are sent. Only the unfinished tail of an event is kept."""

    def __init__(self, start: float):
        self.start = start
        self.first: float | None = None
        self.last: float | None = None
        self._tail = b""

    def feed(self, data: bytes, now: float) -> None:
        events = (self._tail + data).split(b"\n\n")
        self._tail = events.pop()
        if any(_generated(e) for e in events):
            if self.first is None:
                self.first = now
            self.last = now

    def event(self) -> bytes:
        """The `timing` event: milliseconds from the request to the first piece, and from
        the first piece to the last (null where nothing was generated)."""
        first = last = None
        if self.first is not None and self.last is not None:  # set together
            first = round((self.first - self.start) * 1000, 3)
            last = round((self.last - self.first) * 1000, 3)
        return (
            b"event: timing\ndata: "
            + json.dumps({"first_token_ms": first, "decode_ms": last}).encode()
            + b"\n\n"
        )


def _generated(event: bytes) -> bool:
    """Whether an SSE event is a chunk carrying generated output (not the role alone, not
    the usage, not `[DONE]`)."""
    if not event.startswith(b"data: {"):
        return False
    try:
        chunk = json.loads(event[6:])
    except ValueError:
        return False
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


class ProxiedResponse(Response):
    """The API's response to a chat completion with `body`, made for `principal`."""

    def __init__(self, api: FastAPI, principal: Principal, body: bytes):
        super().__init__()
        self.api = api
        self.principal = principal
        self.body_sent = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_sent
        inner: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": scope.get("scheme", "http"),
            "server": scope.get("server"),
            "client": scope.get("client"),
            "path": CHAT_PATH,
            "raw_path": CHAT_PATH.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"host", b"console"),
            ],
            TRUSTED_PRINCIPAL: self.principal,
        }
        # after the body: the page gone, the outer receive says so and the API cancels
        inner_receive = replaying(body, receive)

        start = time.perf_counter()
        timer: StreamTimer | None = None

        async def inner_send(message: Message) -> None:
            nonlocal timer
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k in PASSED_HEADERS]
                message = {**message, "headers": headers}
                if dict(headers).get(b"content-type", b"").startswith(b"text/event-stream"):
                    timer = StreamTimer(start)
            elif timer is not None and message["type"] == "http.response.body":
                timer.feed(message.get("body", b""), time.perf_counter())
                if not message.get("more_body", False):
                    await send(
                        {"type": "http.response.body", "body": timer.event(), "more_body": True}
                    )
            await send(message)

        await self.api(inner, inner_receive, inner_send)
