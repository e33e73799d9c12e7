"""The models one server serves, loaded on demand within a memory budget.

The api asks the pool for a lease on a model by id and releases it when the request ends; it
never holds an engine otherwise. A lease on an unloaded model loads it (every request for it
waits on the same load, at most `load_timeout` seconds, then gets a 503 with Retry-After; a
failed load answers each waiter with its reason and the next request tries again). Before a
load, the models' estimated memory (weights + KV cache, as `llmhost plan` counts it) must fit
the budget: idle models are unloaded least recently used first, pinned ones and ones with
requests in flight never. A model that can never fit is a 400 saying how much it needs. An idle
model unloads after its keep-alive (a request may set it, as Ollama's `keep_alive` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmhost.durations import parse_duration
from llmhost.engines.base import Engine
from llmhost.errors import (
    EngineNotReady,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
)

log = logging.getLogger("llmhost.engines.pool")

Kind = Literal["chat", "embedding", "rerank"]
State = Literal["unloaded", "loading", "loaded"]
GIB = 1 << 30
MAX_KEEP_ALIVE = 30 * 24 * 3600.0  # a month; longer is a mistake (use pinned)


@dataclass(frozen=True)
class ModelSpec:
    """A servable model: how to build its engine (not loaded), what it is, what it costs."""

    id: str
    build: Callable[[], Engine]
    kind: Kind = "chat"
    need_bytes: int = 0  # host memory it holds once loaded (estimate)
    gpu_bytes: dict[int, int] = field(default_factory=dict)  # GPU index: memory it holds there
    keep_alive: float | None = None  # seconds idle before it unloads; None: it stays
    pinned: bool = False  # loaded at start and never unloaded to make room
    rpm: int = 0  # requests per minute to this model, all principals together; 0: no limit
    # Quotas of this model, all principals together: tokens/day, tokens/month, requests/day
    # (None: no quota of that kind; 0: nothing allowed)
    quota: tuple[int | None, int | None, int | None] = (None, None, None)


@dataclass(eq=False)
class _Entry:
    spec: ModelSpec
    state: State = "unloaded"
    engine: Engine | None = None
    loading: asyncio.Task[None] | None = None
    leases: int = 0
    last_used: float = 0.0
    keep_alive: float | None = None
    timer: asyncio.TimerHandle | None = None
    error: str | None = None  # why the last load failed
    loaded_at: float = 0.0
    waiters: int = 0

    def __post_init__(self) -> None:
        self.keep_alive = self.spec.keep_alive


@dataclass
class Pool:
    """Loads, leases and unloads the engines of `specs` (ids unique; the first is the default)."""

    specs: list[ModelSpec]
    budget_bytes: int | None = None  # host memory for models; None: no budget
    gpu_budget: dict[int, int] = field(default_factory=dict)  # GPU index: memory for models
    load_timeout: float = 600.0
    # Called with the model id and its engine once loaded, and before it is closed.
    on_loaded: Callable[[str, Engine], None] | None = None
    on_unloading: Callable[[str, Engine], None] | None = None
    _entries: dict[str, _Entry] = field(init=False)
    _aliases: dict[str, _Entry] = field(init=False)  # the id a loaded engine gives itself
    _lock: asyncio.Lock = field(init=False)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("a pool needs at least one model")
        self._entries, self._aliases = {}, {}
        for spec in self.specs:
            if spec.id in self._entries:
                raise ValueError(f"model id {spec.id!r} is declared twice")
            self._entries[spec.id] = _Entry(spec)
        self._lock = asyncio.Lock()

    @classmethod
    def single(cls, engine: Engine) -> Pool:
        """One model that is always loaded (`llmhost serve MODEL`)."""
        return cls(
            [ModelSpec(id=engine.model_info.id or "default", build=lambda: engine, pinned=True)]
        )

    @property
    def is_single(self) -> bool:
        return len(self._entries) == 1

    # --- lookup --------------------------------------------------------------------------

    @property
    def default_id(self) -> str:
        return self.specs[0].id

    def ids(self) -> list[str]:
        return list(self._entries)

    def entry(self, model_id: str | None) -> _Entry:
        key = model_id or self.default_id
        found = self._entries.get(key) or self._aliases.get(key)
        if found is None:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist; this server serves: "
                + ", ".join(sorted(self._entries)),
                param="model",
            )
        return found

    def loaded(self, model_id: str) -> Engine | None:
        e = self._entries.get(model_id)
        return e.engine if e is not None and e.state == "loaded" else None

    def used_bytes(self) -> int:
        return self._used()["host"]

    def gpu_used_bytes(self) -> dict[int, int]:
        used = self._used()
        return {i: used.get(f"GPU {i}", 0) for i in self.gpu_budget}

    @staticmethod
    def _needs(spec: ModelSpec) -> dict[str, int]:
        """What a model holds, by resource ("host", "GPU 0", ...)."""
        return {"host": spec.need_bytes, **{f"GPU {i}": n for i, n in spec.gpu_bytes.items()}}

    def _budgets(self) -> dict[str, int]:
        out = {f"GPU {i}": n for i, n in self.gpu_budget.items()}
        if self.budget_bytes is not None:
            out["host"] = self.budget_bytes
        return out

    def _used(self) -> dict[str, int]:
        used = {"host": 0}
        for e in self._entries.values():
            if e.state != "unloaded":
                for r, n in self._needs(e.spec).items():
                    used[r] = used.get(r, 0) + n
        return used

    def status(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for e in self._entries.values():
            expires = None
            if e.state == "loaded" and e.leases == 0 and e.keep_alive is not None:
                expires = e.last_used + e.keep_alive
            out.append(
                {
                    "id": e.spec.id,
                    "kind": e.spec.kind,
                    "state": e.state,
                    "pinned": e.spec.pinned,
                    "memory_bytes": e.spec.need_bytes,
                    "gpu_memory_bytes": dict(e.spec.gpu_bytes),
                    "in_flight": e.leases,
                    "waiting": e.waiters,
                    "keep_alive_s": e.keep_alive,
                    "loaded_at": e.loaded_at or None,
                    "last_used": e.last_used or None,
                    "expires_at": expires,
                    "idle_s": round(now - e.last_used, 1) if e.last_used else None,
                    "error": e.error,
                }
            )
        return out

    # --- leases --------------------------------------------------------------------------

    async def acquire(self, model_id: str | None, keep_alive: float | None = None) -> Engine:
        """A lease on the model's engine, loading it first if need be. Release it once."""
        e = self.entry(model_id)
        if keep_alive is not None:
            try:
                e.keep_alive = keep_alive_seconds(keep_alive)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="keep_alive") from None
        if e.state != "loaded":
            await self._wait_loaded(e)
        assert e.engine is not None
        e.leases += 1
        e.last_used = time.time()
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None
        return e.engine

    def release(self, model_id: str) -> None:
        e = self._entries[model_id]
        e.leases -= 1
        e.last_used = time.time()
        if e.leases == 0:
            self._arm(e)

    def _arm(self, e: _Entry) -> None:
        """Unload `e` once it has been idle for its keep-alive."""
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None
        if e.keep_alive is None or e.spec.pinned or e.state != "loaded":
            return
        loop = asyncio.get_running_loop()
        e.timer = loop.call_later(e.keep_alive, lambda: asyncio.ensure_future(self._expire(e)))

    async def _expire(self, e: _Entry) -> None:
        e.timer = None
        if e.leases == 0 and e.state == "loaded":
            log.info("unloading %s: idle for its keep-alive (%ss)", e.spec.id, e.keep_alive)
            await self._unload(e)

    # --- loading and unloading -----------------------------------------------------------

    async def _wait_loaded(self, e: _Entry) -> None:
        async with self._lock:
            if e.state == "unloaded":
                await self._make_room(e)
                e.state, e.error = "loading", None
                e.loading = asyncio.create_task(self._load(e), name=f"load-{e.spec.id}")
        task = e.loading
        if task is None:  # loaded while we waited for the lock
            return
        e.waiters += 1
        try:
            await asyncio.wait_for(asyncio.shield(task), self.load_timeout)
        except TimeoutError:
            raise EngineNotReady(
                f"the model '{e.spec.id}' is still loading; retry shortly", retry_after=5
            ) from None
        except Exception:
            raise ModelLoadError(f"the model '{e.spec.id}' failed to load: {e.error}") from None
        finally:
            e.waiters -= 1

    async def _load(self, e: _Entry) -> None:
        t0 = time.perf_counter()
        try:
            engine = e.spec.build()
            await engine.start()
        except BaseException as exc:
            e.error = getattr(exc, "message", None) or str(exc) or repr(exc)
            e.state, e.engine, e.loading = "unloaded", None, None
            log.error("model %s failed to load: %s", e.spec.id, e.error)
            raise
        e.engine, e.state, e.loading = engine, "loaded", None
        e.loaded_at = e.last_used = time.time()
        alias = engine.model_info.id
        if alias and alias not in self._entries:
            self._aliases.setdefault(alias, e)
        log.info("loaded %s in %.1fs", e.spec.id, time.perf_counter() - t0)
        if self.on_loaded is not None:
            self.on_loaded(e.spec.id, engine)
        if e.leases == 0 and e.waiters == 0:
            self._arm(e)

    async def _make_room(self, e: _Entry) -> None:
        """Unload idle models, least recently used first, until `e` fits the budget of every
        resource it needs (host memory and each GPU's); only models holding a resource that
        is short are unloaded."""
        budgets = self._budgets()
        needs = {r: n for r, n in self._needs(e.spec).items() if n > 0 and r in budgets}
        for r, n in needs.items():
            if n > budgets[r]:
                raise InvalidRequest(
                    f"the model '{e.spec.id}' needs about {n / GIB:.1f} GiB of {r} memory, "
                    f"more than this server's whole model memory budget of "
                    f"{budgets[r] / GIB:.1f} GiB there",
                    param="model",
                )
        idle = sorted(
            (
                o
                for o in self._entries.values()
                if o.state == "loaded" and o.leases == 0 and o.waiters == 0 and not o.spec.pinned
            ),
            key=lambda o: o.last_used,
        )
        while short := [r for r, n in needs.items() if self._used().get(r, 0) + n > budgets[r]]:
            holders = [o for o in idle if any(self._needs(o.spec).get(r, 0) for r in short)]
            if not holders:
                busy = [o.spec.id for o in self._entries.values() if o.state != "unloaded"]
                r = short[0]
                raise Overloaded(
                    f"the model '{e.spec.id}' needs about {needs[r] / GIB:.1f} GiB of {r} "
                    f"memory and the budget of {budgets[r] / GIB:.1f} GiB there is held by "
                    f"models in use or pinned ({', '.join(busy)}); retry shortly",
                    retry_after=5,
                )
            victim = holders[0]
            idle.remove(victim)
            log.info("unloading %s to make room for %s", victim.spec.id, e.spec.id)
            await self._unload(victim)

    async def _unload(self, e: _Entry) -> None:
        engine, e.engine = e.engine, None
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None
        e.state = "unloaded"
        if engine is None:
            return
        if self.on_unloading is not None:
            self.on_unloading(e.spec.id, engine)
        try:
            await engine.close()
        except Exception:
            log.exception("closing %s failed", e.spec.id)

    # --- admin ---------------------------------------------------------------------------

    async def load(self, model_id: str) -> None:
        """Load a model now (admin); nothing is leased."""
        e = self.entry(model_id)
        if e.state != "loaded":
            await self._wait_loaded(e)
        e.last_used = time.time()
        if e.leases == 0:
            self._arm(e)

    async def unload(self, model_id: str) -> bool:
        """Unload a model now (admin); False if it has requests in flight."""
        e = self.entry(model_id)
        async with self._lock:
            if e.leases:
                return False
            if e.loading is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(e.loading)
            if e.state == "loaded":
                await self._unload(e)
        return True

    async def start(self) -> None:
        """Load the pinned models (the one model of `single`), in order."""
        for e in self._entries.values():
            if e.spec.pinned:
                await self.load(e.spec.id)

    async def close(self) -> None:
        for e in self._entries.values():
            if e.loading is not None:
                e.loading.cancel()
                with contextlib.suppress(BaseException):
                    await e.loading
            await self._unload(e)


def keep_alive_seconds(value: str | float | int) -> float:
    """A keep-alive (seconds, or a duration like 5m) checked to be 0 to 30 days; ValueError
    otherwise, for a request field, a setting and the pool alike."""
    seconds = parse_duration(value)
    if not 0 <= seconds <= MAX_KEEP_ALIVE:
        raise ValueError(
            f"keep_alive must be 0 to {MAX_KEEP_ALIVE:.0f} seconds (30 days), got {value!r:.40}"
        )
    return seconds
