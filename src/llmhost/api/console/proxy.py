"""The playground's chat completion: the console calls the API app in-process (its whole edge,
so the request is rate-limited, audited and measured like any other) for the admin logged
in, and streams the API's answer straight back to the page. The API sees the principal the
console vouches for, never the session cookie."""

from __future__ import annotations

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

        async def inner_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        (k, v) for k, v in message.get("headers", []) if k in PASSED_HEADERS
                    ],
                }
            await send(message)

        await self.api(inner, inner_receive, inner_send)
