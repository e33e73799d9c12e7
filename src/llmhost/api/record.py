"""`RequestRecord`: what one request's handlers and middlewares tell each other, made once per
request at the edge of the app and kept in the ASGI scope's state under one key.

Who writes what: the request-id middleware makes it (`request_id`); authentication sets
`principal`; a route's lease on a model goes in `leases`; the serving layer fills in what it
learns (model, prompt, stream, usage, length of the text, an error sent in-band). The audit,
rate-limit, quota, metrics and lease middlewares read it when the response is over."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.types import Scope

from llmhost.security.auth import Principal
from llmhost.security.quota import Admission
from llmhost.types import Usage

RECORD_KEY = "llmhost.request"

# A request's prompt as the audit log receives it: text, token ids, or several of either
Prompt = str | list[int] | list[str] | list[list[int]]


@dataclass
class RequestRecord:
    request_id: str = ""
    principal: Principal | None = None  # None: a public path, or not authenticated yet
    leases: list[str] = field(default_factory=list)  # model ids to release when it ends
    model: str = ""
    prompt: Prompt | None = None
    stream: bool = False
    usage: Usage | None = None  # the final usage, once the response is whole
    usage_so_far: Usage | None = None  # while it runs (a stream cut midway keeps this)
    tokens_sent: int = 0  # tokens streamed by an engine that reports usage only at the end
    chars: int = 0  # characters of text generated
    # The status of an error sent in-band, after a 200 status line had gone out
    error_status: int | None = None
    # The model a generation was admitted to (routes.serving_for) and when, for usage
    # accounting, and the quotas its tokens are charged to when it ends
    served_model: str = ""
    served_at: float = 0.0
    quota: Admission | None = None

    def tokens(self) -> Usage:
        """The tokens the request used: the final usage, else what was produced so far (a
        stream dropped midway, a request cut by shutdown), else the tokens sent."""
        if self.usage is not None:
            return self.usage
        if self.usage_so_far is not None:
            return self.usage_so_far
        return Usage(0, self.tokens_sent)


def request_record(scope: Scope) -> RequestRecord:
    """The record of the request `scope` belongs to, made on first use."""
    state = scope.setdefault("state", {})
    record = state.get(RECORD_KEY)
    if not isinstance(record, RequestRecord):
        record = state[RECORD_KEY] = RequestRecord()
    return record
