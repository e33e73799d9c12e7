"""An engine that forwards to another OpenAI-compatible server (vLLM, TGI, llama-server,
another llmhost), so llmhost's keys, limits, audit log and metrics sit in front of it.

Chat requests go to the upstream's /v1/chat/completions with their messages (the upstream
applies its own chat template), completions to /v1/completions; both stream, with usage
asked for in the last chunk. Upstream refusals become the same errors our own engines raise,
before the first delta, so clients see a real HTTP status. Closing a stream closes the
upstream connection, which cancels the generation there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import httpx

from llmhost.engines.base import Engine
from llmhost.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
)
from llmhost.types import (
    EngineHealth,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    TokenDelta,
    Usage,
)

if TYPE_CHECKING:
    from llmhost.config import Settings

log = logging.getLogger("llmhost.engines.upstream")
# The upstream's finish reasons passed on; any other is a plain stop.
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _error_for(status: int, body: bytes) -> Exception:
    try:
        err = json.loads(body).get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        err, message = {}, None
    message = message or body.decode(errors="replace")[:500] or f"HTTP {status}"
    message = f"upstream: {message}"
    code = err.get("code") if isinstance(err, dict) else None
    if status == 400 and (code == "context_length_exceeded" or "context length" in message):
        return ContextLengthExceeded(message)
    if status in (400, 422):
        return InvalidRequest(message)
    if status == 404:
        return ModelNotFound(message)
    if status == 429:
        return RateLimited(message)
    if status in (502, 503, 504):
        return ServiceUnavailable(message)
    return EngineError(message)


class OpenAIUpstreamEngine(Engine):
    name = "openai"
    # The upstream renders the template, constrains output and parses tool calls itself; the
    # request's fields go to it unchanged and its tool calls come back as it sent them.
    remote = True
    supports_tools = True
    supports_schema = True

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        served_name: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        health_every: float = 5.0,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ModelLoadError(f"upstream URL {base_url!r} must be http(s)://...")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.upstream_model = model
        self.served_name = served_name
        self.api_key = api_key
        self.timeout = timeout
        self.health_every = health_every
        self.model_info = ModelInfo(id=served_name or model or "upstream", context_length=0)
        self._client: httpx.AsyncClient | None = None
        self._healthy = False
        self._detail = "not started"
        self._checker: asyncio.Task[None] | None = None
        self.active = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIUpstreamEngine:
        if not settings.upstream_url:
            raise ModelLoadError("the openai engine needs --upstream-url (LLMHOST_UPSTREAM_URL)")
        return cls(
            settings.upstream_url,
            model=settings.model,
            served_name=settings.model_name,
            api_key=settings.upstream_api_key,
            timeout=settings.upstream_timeout,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _models(self) -> list[dict[str, Any]]:
        assert self._client is not None
        r = await self._client.get("/v1/models", timeout=10)
        if r.status_code != 200:
            raise _error_for(r.status_code, r.content)
        return r.json().get("data") or []

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers(),
            timeout=httpx.Timeout(self.timeout, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128),
        )
        try:
            models = await self._models()
        except httpx.HTTPError as exc:
            raise ModelLoadError(f"upstream {self.base_url} does not answer: {exc}") from exc
        except Exception as exc:
            raise ModelLoadError(f"upstream {self.base_url}: {exc}") from exc
        ids = [m.get("id") for m in models]
        if self.upstream_model is None:
            if not ids:
                raise ModelLoadError(f"upstream {self.base_url} lists no model")
            self.upstream_model = ids[0]
        elif self.upstream_model not in ids:
            raise ModelLoadError(
                f"upstream {self.base_url} has no model {self.upstream_model!r} (it has "
                f"{', '.join(map(str, ids)) or 'none'})"
            )
        entry = next(m for m in models if m.get("id") == self.upstream_model)
        ctx = entry.get("context_length") or entry.get("max_model_len") or 0
        self.model_info = ModelInfo(
            id=self.served_name or self.upstream_model or "",
            context_length=int(ctx),
            owned_by=str(entry.get("owned_by") or "upstream"),
        )
        self._healthy, self._detail = True, ""
        self._checker = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_every)
            try:
                await self._models()
                self._healthy, self._detail = True, ""
            except Exception as exc:
                if self._healthy:
                    log.warning("upstream %s unhealthy: %s", self.base_url, exc)
                self._healthy, self._detail = False, f"upstream: {exc}"

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def health(self) -> EngineHealth:
        return EngineHealth(ok=self._healthy, detail=self._detail, stats={"running": self.active})

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Through the upstream's /tokenize (vLLM and llama-server have one)."""
        body = {
            "model": self.upstream_model,
            "prompt": text,
            "content": text,
            "add_special_tokens": add_special,
            "add_special": add_special,
        }
        try:
            r = httpx.post(
                self.base_url + "/tokenize", json=body, headers=self._headers(), timeout=10
            )
            r.raise_for_status()
            return [t if isinstance(t, int) else t.get("id", 0) for t in r.json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise InvalidRequest(
                "the upstream cannot count tokens (no /tokenize); use max_new_tokens"
            ) from exc

    # --- generation ------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        # extensions vLLM, llama-server and llmhost understand; sent only when set
        if s.top_k:
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        if s.repeat_penalty != 1.0:
            body["repetition_penalty"] = s.repeat_penalty
        if s.ignore_eos:
            body["ignore_eos"] = True
        if not request.cache_prompt:  # llama-server's field; sent only to opt out
            body["cache_prompt"] = False
        if request.messages is not None:
            chat = {**body, **(request.forward or {}), "messages": list(request.messages)}
            return "/v1/chat/completions", chat
        if not isinstance(request.prompt, str):
            raise InvalidRequest("the upstream engine takes text prompts")
        return "/v1/completions", {**body, "prompt": request.prompt}

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._client is None:
            raise ServiceUnavailable("the upstream engine is not started")
        path, body = self._body(request)
        headers = {"X-Request-Id": request.request_id} if request.request_id else {}
        try:
            req = self._client.build_request("POST", path, json=body, headers=headers)
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"upstream {self.base_url} unreachable: {exc}") from exc
        self.active += 1
        try:
            if resp.status_code != 200:
                raise _error_for(resp.status_code, await resp.aread())
            finish, usage, n_chunks, done = None, None, 0, False
            async for line in resp.aiter_lines():
                # Read on past [DONE] to the end of the body: a response read to its end
                # returns its connection to the pool, one closed early costs a new TCP
                # connection (and its set-up on both servers) for the next request.
                if done or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    raise EngineError(f"upstream: {err.get('message', err)}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text")
                    delta = choice.get("delta") or {}
                    if text is None:
                        text = delta.get("content") or ""
                    calls = tuple(c for c in delta.get("tool_calls") or () if isinstance(c, dict))
                    finish = choice.get("finish_reason") or finish
                    if text or calls:
                        n_chunks += 1
                        yield TokenDelta(text=text, tool_calls=calls)
            u = Usage(
                prompt_tokens=int((usage or {}).get("prompt_tokens", 0)),
                completion_tokens=int((usage or {}).get("completion_tokens", n_chunks)),
            )
            reason = _FINISH.get(finish, "stop") if isinstance(finish, str) else "stop"
            yield TokenDelta(text="", finish_reason=reason, usage=u)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream connection lost: {exc}") from exc
        finally:
            self.active -= 1
            await resp.aclose()
