"""Request bodies read within a size limit: refused (413) at once when the Content-Length says
the body is too large, else as soon as the bytes received pass the limit; never read whole
first. Shared by the server's edge middleware and the router."""

from __future__ import annotations

from starlette.types import Message, Receive

from llmhost.errors import InvalidRequest, PayloadTooLarge


def check_declared(declared: bytes | str | None, limit: int, setting: str) -> None:
    """Refuse from the Content-Length header alone (None: the header is absent)."""
    if declared is None:
        return
    text = declared.decode("latin-1") if isinstance(declared, bytes) else declared
    if not text.isdigit():
        raise InvalidRequest("Content-Length is not a number")
    if len(text) > 18 or int(text) > limit:
        raise too_large(limit, setting, int(text) if len(text) <= 18 else None)


def too_large(limit: int, setting: str, size: int | None = None) -> PayloadTooLarge:
    said = f" ({size} bytes)" if size is not None else ""
    return PayloadTooLarge(
        f"the request body{said} is over this server's limit of {limit} bytes ({setting})"
    )


async def read_body_within(
    receive: Receive, limit: int, declared: bytes | str | None, setting: str
) -> bytes | None:
    """The whole body, or None when the client went away first; PayloadTooLarge (or
    InvalidRequest for a malformed Content-Length) as soon as the limit is passed."""
    check_declared(declared, limit, setting)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit, setting)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` as the whole request once (it was read already), then
    what `receive` gives: the client's disconnect, so an app behind it can stop early."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
