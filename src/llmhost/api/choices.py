"""The choices of one request: n per prompt (and a completion request may carry several
prompts), each its own engine stream, run side by side and merged in arrival order.

The n choices of one prompt always run together (the engine shares their prompt's prefill);
prompt groups run at most `width` at a time, so a long prompt list waits here instead of
filling the engine's queue. Every first delta of the first wave arrives before the response
starts, so request errors are HTTP errors; a later group's error travels in-band."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from llmhost.api.logprobs import LogprobShaper
from llmhost.api.record import RequestRecord
from llmhost.api.serving_chat import gather_remote_calls
from llmhost.api.sse import Kind, chunk_choices, usage_body, whole_choice
from llmhost.engines.base import TokenStream
from llmhost.errors import EngineError
from llmhost.types import GenerationRequest, TokenDelta, Usage

Start = Callable[[GenerationRequest], Awaitable[tuple[TokenDelta, TokenStream]]]


@dataclass(eq=False)
class Choice:
    """One choice: its engine request, how its output is shaped, and what it produced."""

    index: int
    group: int  # which prompt it answers (prompt tokens are counted once per group)
    gen: GenerationRequest
    shaper: Any  # chat or text shaper (serving.py)
    echo: str = ""  # the prompt's text, shown before the output (completions' echo)
    logprobs: LogprobShaper | None = None
    first: TokenDelta | None = None
    stream: TokenStream | None = None
    opening: bool = True  # no chunk sent yet
    done: bool = False
    usage: Usage = field(default_factory=lambda: Usage(0, 0))

    def note(self, d: TokenDelta) -> None:
        """Keep the usage so far (an engine that reports it only at the end: tokens seen)."""
        if d.usage is not None:
            self.usage = d.usage
        elif d.token_ids:
            self.usage = Usage(self.usage.prompt_tokens, self.usage.completion_tokens + 1)
        if d.finish_reason is not None:
            self.done = True


def total_usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt, completion tokens of every choice."""
    prompts: dict[int, int] = {}
    for c in choices:
        prompts[c.group] = max(prompts.get(c.group, 0), c.usage.prompt_tokens)
    return Usage(sum(prompts.values()), sum(c.usage.completion_tokens for c in choices))


class Choices:
    """Runs the choices; iterate `deltas()` once, then `aclose()`."""

    def __init__(self, choices: list[Choice], start: Start, width: int):
        self.all = choices
        self._start = start
        groups: dict[int, list[Choice]] = {}
        for c in choices:
            groups.setdefault(c.group, []).append(c)
        self._groups = list(groups.values())
        self._width = max(1, width)
        self._next = 0  # the next group to start
        self._queue: asyncio.Queue[tuple[Choice, TokenDelta | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: set[asyncio.Future[Any]] = set()

    async def open(self) -> None:
        """Start the first wave of groups and wait for each choice's first delta."""
        wave = self._groups[: self._width]
        self._next = len(wave)
        try:
            await self._open([c for g in wave for c in g])
        except BaseException:
            await self.aclose()
            raise

    async def _open(self, choices: list[Choice]) -> None:
        got = await asyncio.gather(*(self._start(c.gen) for c in choices), return_exceptions=True)
        failed = next((g for g in got if isinstance(g, BaseException)), None)
        for c, g in zip(choices, got, strict=True):
            if not isinstance(g, BaseException):
                c.first, c.stream = g
        if failed is not None:
            raise failed

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _begin(self, c: Choice) -> None:
        """Queue a started choice's first delta and pump the rest of its stream."""
        assert c.first is not None and c.stream is not None
        self._queue.put_nowait((c, c.first))
        if c.first.finish_reason is not None:
            return
        stream = c.stream

        async def pump() -> None:
            try:
                async for d in stream:
                    self._queue.put_nowait((c, d))
                    if d.finish_reason is not None:
                        return
                self._queue.put_nowait((c, None))  # ended without a finish reason
            except Exception as exc:  # handed to the consumer, which answers in-band
                self._queue.put_nowait((c, exc))
            finally:
                await stream.aclose()

        self._spawn(pump())

    def _start_group(self) -> None:
        group = self._groups[self._next]
        self._next += 1

        async def run() -> None:
            try:
                await self._open(group)
            except Exception as exc:
                self._queue.put_nowait((group[0], exc))
                return
            for c in group:
                self._begin(c)

        self._spawn(run())

    async def deltas(self) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """Every delta of every choice as it comes; a choice's last has its finish reason."""
        if len(self.all) == 1:  # one stream: no tasks, no queue
            c = self.all[0]
            assert c.first is not None and c.stream is not None
            d = c.first
            while True:
                c.note(d)
                yield c, d
                if d.finish_reason is not None:
                    return
                d = await anext(c.stream)
        for c in self.all:
            if c.first is not None:
                self._begin(c)
        outstanding = len(self.all)
        while outstanding:
            c, item = await self._queue.get()
            if item is None:
                raise EngineError("a generation ended without a finish reason")
            if isinstance(item, BaseException):
                raise item
            c.note(item)
            if item.finish_reason is not None:
                outstanding -= 1
                if self._next < len(self._groups) and self._group_done(c):
                    self._start_group()
            yield c, item

    def _group_done(self, c: Choice) -> bool:
        return all(o.done for o in self.all if o.group == c.group)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for c in self.all:
            if c.stream is not None:
                with contextlib.suppress(Exception):
                    await c.stream.aclose()


def chunk_body(kind: Kind, c: Choice, d: TokenDelta) -> list[dict[str, Any]]:
    """The chunk choices of one delta of choice `c` (the echoed prompt before its first)."""
    lp = None
    if c.logprobs is not None and (d.prompt_logprobs or d.logprobs):
        lp = c.logprobs.shape(d.prompt_logprobs + d.logprobs)
    if c.opening and c.echo:
        d = replace(d, text=c.echo + d.text)
    out = chunk_choices(kind, c.shaper, d, c.opening, c.index, lp)
    if out:
        c.opening = False
    return out


async def whole_body(
    run: Choices, kind: Kind, head: dict[str, Any], record: RequestRecord
) -> dict[str, Any]:
    """Every choice collected into one response body (tool calls from an upstream folded)."""
    parts: dict[int, list[str]] = {c.index: [c.echo] for c in run.all}
    lps: dict[int, list[dict[str, Any]]] = {c.index: [] for c in run.all}
    calls: dict[int, dict[int, dict[str, Any]]] = {c.index: {} for c in run.all}
    finish: dict[int, str | None] = {}
    async for c, d in run.deltas():
        parts[c.index].append(d.text)
        gather_remote_calls(calls[c.index], d.tool_calls)
        if c.logprobs is not None and (d.prompt_logprobs or d.logprobs):
            lps[c.index].append(c.logprobs.shape(d.prompt_logprobs + d.logprobs))
        if d.finish_reason is not None:
            finish[c.index] = d.finish_reason
        record.usage_so_far = total_usage(run.all)
    record.usage = total_usage(run.all)
    usage = usage_body(record.usage)
    out = []
    for c in run.all:
        text = "".join(parts[c.index])
        body = c.shaper.message(text, [calls[c.index][i] for i in sorted(calls[c.index])])
        reason = c.shaper.finish_reason(finish.get(c.index))
        merged = c.logprobs.merge(lps[c.index]) if c.logprobs is not None else None
        if c.logprobs is not None and merged is None:
            merged = c.logprobs.shape(())
        out.append(whole_choice(kind, body, reason, c.index, merged))
    record.chars = sum(len("".join(p)) for p in parts.values())
    return {**head, "object": kind.object, "choices": out, "usage": usage}
