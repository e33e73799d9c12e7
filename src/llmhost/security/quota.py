"""Quotas over calendar windows in UTC: tokens per day, tokens per month and requests per day,
per API key, per user and per model (all principals together). A day's counters reset at
00:00 UTC, a month's on the 1st. A request is counted (requests/day) before it runs and
refused once a token budget is used up; its tokens are charged from its usage when it ends.

Counters are plain integers: in this process's memory by default, or in Redis (through the
`limits` library's connection, the rate limits' own) so that every instance pointed at it
shares one budget; there a request's check and count are one Lua script, one round trip and
atomic across instances.
Each counter's key names its window (`2026-11-27`, `2026-11`), so a new window starts from
zero exactly; the expiry (a day after the window ends) only clears old windows away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from llmhost.errors import ConfigError
from llmhost.security.redis_store import redis_storage

log = logging.getLogger("llmhost.quota")
Scope = Literal["key", "user", "model"]
Unit = Literal["tokens/day", "tokens/month", "requests/day"]
MAX_QUOTA = 1 << 53  # a counter Redis and JSON both hold exactly
_GRACE = 86400  # seconds a window's counters outlive it, for instances whose clocks lag


@dataclass(frozen=True)
class Quota:
    """The budgets of one key, user or model; None: no quota of that kind. 0 is a quota too:
    nothing is allowed."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_day: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens_per_day", "tokens_per_month", "requests_per_day"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA
            ):
                raise ConfigError(f"{name} is a whole number from 0 to {MAX_QUOTA} (or unset)")

    @property
    def is_set(self) -> bool:
        budgets = (self.tokens_per_day, self.tokens_per_month, self.requests_per_day)
        return any(v is not None for v in budgets)

    def token_limits(self) -> tuple[tuple[Unit, int], ...]:
        """The token quotas that are set, with their windows."""
        pairs: tuple[tuple[Unit, int | None], ...] = (
            ("tokens/day", self.tokens_per_day),
            ("tokens/month", self.tokens_per_month),
        )
        return tuple((unit, limit) for unit, limit in pairs if limit is not None)


NO_QUOTA = Quota()
Target = tuple[Scope, str, Quota]


@dataclass(frozen=True)
class QuotaPolicy:
    """Whose quotas apply to a request: its key's own, its user's (named in the settings, or
    the server's default for users) and its model's."""

    user_default: Quota = NO_QUOTA
    users: Mapping[str, Quota] = field(default_factory=dict)

    def targets(
        self, key_id: str | None, key_quota: Quota, user_id: str, model_id: str, model_quota: Quota
    ) -> tuple[Target, ...]:
        """The budgets a request draws on, only those with a quota set (often none)."""
        user_quota = self.users.get(user_id, self.user_default)
        found: list[Target] = []
        if key_id is not None and key_quota.is_set:
            found.append(("key", key_id, key_quota))
        if user_quota.is_set:
            found.append(("user", user_id, user_quota))
        if model_quota.is_set:
            found.append(("model", model_id, model_quota))
        return tuple(found)


@dataclass(frozen=True)
class Window:
    """The calendar day and month a moment falls in, and when each ends (Unix seconds)."""

    day: str
    month: str
    day_end: float
    month_end: float

    @classmethod
    def at(cls, now: float) -> Window:
        t = datetime.fromtimestamp(now, timezone.utc)
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        next_day = start + timedelta(days=1)
        first = start.replace(day=1)
        next_month = (
            first.replace(year=first.year + 1, month=1)
            if first.month == 12
            else (first.replace(month=first.month + 1))
        )
        return cls(
            start.strftime("%Y-%m-%d"),
            start.strftime("%Y-%m"),
            next_day.timestamp(),
            next_month.timestamp(),
        )

    def end(self, unit: Unit) -> float:
        return self.month_end if unit == "tokens/month" else self.day_end

    def label(self, unit: Unit) -> str:
        return self.month if unit == "tokens/month" else self.day


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class QuotaExceeded:
    """Which quota refused a request and when it frees up."""

    scope: Scope
    name: str
    unit: Unit
    limit: int
    resets_at: float  # Unix seconds
    retry_after: float  # seconds from the refusal

    @property
    def message(self) -> str:
        return (
            f"quota exceeded: {self.scope} {self.name!r} has {self.limit} {self.unit}; "
            f"it resets at {_iso(self.resets_at)}"
        )


@dataclass(frozen=True)
class Admission:
    """A request let through: the budgets its tokens are charged to when it ends."""

    window: Window
    targets: tuple[Target, ...]


def _key(unit: Unit, window: Window, scope: Scope, name: str) -> str:
    # The name goes last: it is the only free-form part, so no two counters share a key. The
    # braces are a Redis Cluster hash tag: every quota counter on one node, so that one
    # script may read and count those of a request together.
    return f"{{quota}}:{unit}:{window.label(unit)}:{scope}:{name}"


# Redis: the check and the count of a request in one script, so one round trip and atomic
# (no other instance's request between this one's check and its count).
# KEYS: the token counters to check, then the request counters to check and count.
# ARGV[1]: how many token counters; ARGV[1 + i]: KEYS[i]'s limit; last: when the request
# counters expire (Unix seconds). Returns 0, or the index of the counter that refuses.
_ADMIT = """
local tokens = tonumber(ARGV[1])
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[1 + i]) then return i end
end
for i = tokens + 1, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIREAT', KEYS[i], ARGV[#KEYS + 2])
end
return 0
"""
# KEYS: counters; ARGV[2i - 1]: the amount to add to KEYS[i] (negative: a refund); ARGV[2i]:
# when KEYS[i] expires (Unix seconds).
_ADD = """
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
end
return 0
"""

Counter = tuple[str, int]  # a counter's key, and its limit or when it expires (Unix seconds)
Addition = tuple[str, int, int]  # a counter's key, the amount to add, when it expires


class Counters:
    """Integer counters in this process's memory. Every method runs without yielding to the
    event loop, so a request's check and count are atomic among this server's requests."""

    SWEEP_EVERY_S = 60

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._values: dict[str, int] = {}
        self._expire_at: dict[str, int] = {}
        self._next_sweep = 0.0

    def _sweep(self) -> None:
        """Forgets expired counters, at most once a minute (old windows' counters only)."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_EVERY_S
        for key in [k for k, at in self._expire_at.items() if at <= now]:
            del self._values[key], self._expire_at[key]

    async def admit(self, tokens: list[Counter], requests: list[Counter], expire_at: int) -> int:
        """0 when no counter of `tokens` or `requests` has reached its limit, the requests
        counted then; else the index (from 1, tokens first) of the first that has."""
        self._sweep()
        for i, (key, limit) in enumerate([*tokens, *requests], 1):
            if self._values.get(key, 0) >= limit:
                return i
        self._add([key for key, _ in requests], 1, expire_at)
        return 0

    def _add(self, keys: list[str], amount: int, expire_at: int) -> None:
        for key in keys:
            self._values[key] = self._values.get(key, 0) + amount
            self._expire_at[key] = max(expire_at, self._expire_at.get(key, 0))

    async def add(self, additions: list[Addition]) -> None:
        for key, amount, expire_at in additions:
            self._add([key], amount, expire_at)

    async def get(self, key: str) -> int:
        self._sweep()
        return self._values.get(key, 0)


class RedisCounters:
    """The counters in Redis, shared by every instance using it (through the `limits`
    library's connection, the rate limits' own): each step one script, one round trip."""

    def __init__(self, storage: Any):
        bridge = storage.bridge
        self.storage = storage  # keeps the connection
        self._prefixed: Callable[[str], str] = bridge.prefixed_key
        self._admit = bridge.get_connection().register_script(_ADMIT)
        self._add = bridge.get_connection().register_script(_ADD)

    async def admit(self, tokens: list[Counter], requests: list[Counter], expire_at: int) -> int:
        keys = [self._prefixed(k) for k, _ in (*tokens, *requests)]
        args = [len(tokens), *(limit for _, limit in (*tokens, *requests)), expire_at]
        return int(await self._admit(keys=keys, args=args))

    async def add(self, additions: list[Addition]) -> None:
        if additions:
            keys = [self._prefixed(k) for k, _, _ in additions]
            await self._add(keys=keys, args=[x for _, n, at in additions for x in (n, at)])

    async def get(self, key: str) -> int:
        return int(await self.storage.get(key))


class Quotas:
    """The counters of every quota, checked and charged by the api layer."""

    COALESCE_S = 0.005  # Redis: charges ending this close together are sent as one

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str = "llmhost",
        clock: Callable[[], float] = time.time,
    ):
        self.counters: Counters | RedisCounters = Counters(clock)
        if redis_url:
            self.counters = RedisCounters(redis_storage(redis_url, namespace))
        self.remote = bool(redis_url)
        self.clock = clock
        self.refused = 0
        # Redis: token charges not sent yet, per counter (the amount, when it expires)
        self._pending: dict[str, tuple[int, int]] = {}
        self._sender: asyncio.Task[None] | None = None
        self._failing = False  # the last send failed

    def _expire_at(self, window: Window, unit: Unit) -> int:
        return int(window.end(unit)) + _GRACE

    def _refusal(
        self, scope: Scope, name: str, unit: Unit, limit: int, window: Window, now: float
    ) -> QuotaExceeded:
        self.refused += 1
        end = window.end(unit)
        return QuotaExceeded(scope, name, unit, limit, end, max(1.0, end - now))

    async def admit(self, targets: Sequence[Target]) -> Admission | QuotaExceeded:
        """Count one request against every requests/day quota of `targets` and check their
        token quotas, atomically: refused, nothing is counted."""
        now = self.clock()
        window = Window.at(now)
        todo = tuple(t for t in targets if t[2].is_set)
        checks: list[tuple[Scope, str, Unit, int]] = [
            (s, n, u, lim) for s, n, q in todo for u, lim in q.token_limits()
        ]
        tokens = len(checks)
        checks += [
            (s, n, "requests/day", q.requests_per_day)
            for s, n, q in todo
            if q.requests_per_day is not None
        ]
        if not checks:
            return Admission(window, todo)
        counters = [(_key(u, window, s, n), lim) for s, n, u, lim in checks]
        refused = await self.counters.admit(
            counters[:tokens], counters[tokens:], self._expire_at(window, "requests/day")
        )
        if refused:
            scope, name, unit, limit = checks[refused - 1]
            return self._refusal(scope, name, unit, limit, window, now)
        return Admission(window, todo)

    def _charges(self, admission: Admission, tokens: int) -> list[Addition]:
        window = admission.window
        return [
            (_key(unit, window, scope, name), tokens, self._expire_at(window, unit))
            for scope, name, quota in admission.targets
            for unit, _limit in quota.token_limits()
        ]

    async def charge(self, admission: Admission, tokens: int) -> None:
        """Charge the tokens a finished request used to the windows it was admitted in (a
        stream that ends after midnight still pays into the day it started)."""
        if tokens > 0 and admission.targets:
            await self.counters.add(self._charges(admission, tokens))

    async def charge_soon(self, admission: Admission, tokens: int) -> None:
        """`charge`, without keeping the request's connection waiting for Redis: there the
        charges of the requests that end within `COALESCE_S` of each other are summed per
        counter and sent together, in one script from a task of its own (`drain` sends what
        is left on shutdown); in memory it is done at once."""
        if not self.remote:
            await self.charge(admission, tokens)
            return
        if tokens <= 0 or not admission.targets:
            return
        for key, amount, expire_at in self._charges(admission, tokens):
            self._queue(key, amount, expire_at)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_soon())
            self._sender.add_done_callback(self._sent)

    async def _send_soon(self) -> None:
        # sends until nothing more came while it waited or sent; charge_soon starts another
        # once this one is done
        while True:
            await asyncio.sleep(self.COALESCE_S)
            if not self._pending:
                return
            await self._send()

    async def _send(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            await self.counters.add([(key, n, at) for key, (n, at) in pending.items()])
            if self._failing:
                self._failing = False
                log.warning("quota charges reach Redis again")
        except BaseException:
            # kept, and sent with the next charges (or by drain): a Redis outage loses
            # nothing while this process lives; there is one entry per counter, however long
            for key, (n, at) in pending.items():
                self._queue(key, n, at)
            raise

    def _queue(self, key: str, amount: int, expire_at: int) -> None:
        """Adds a charge to those not sent yet: one entry per counter, summed."""
        n, at = self._pending.get(key, (0, 0))
        self._pending[key] = (n + amount, max(at, expire_at))

    def _sent(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or self._failing:
            return
        self._failing = True  # said once per outage, not once per request
        log.error(
            "sending quota charges to Redis failed (they are kept and sent once it answers): %s",
            task.exception(),
        )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """On shutdown: waits (at most `timeout_s`) for the charges on their way, then sends
        the rest; never raises (what cannot be sent is logged with its amount)."""
        if self._sender is not None and not self._sender.done():
            await asyncio.wait({self._sender}, timeout=timeout_s)
        try:
            await asyncio.wait_for(self._send(), timeout_s)
        except Exception as exc:  # shutdown goes on; the loss is logged
            lost = sum(n for n, _ in self._pending.values())
            log.error(
                "quota charges not sent to Redis: %d tokens over %d counters: %s",
                lost,
                len(self._pending),
                exc,
            )

    async def refund(self, admission: Admission) -> None:
        """Take back the request an admission counted, for a request that never ran (its
        model could not be leased)."""
        window = admission.window
        expire_at = self._expire_at(window, "requests/day")
        await self.counters.add(
            [
                (_key("requests/day", window, scope, name), -1, expire_at)
                for scope, name, quota in admission.targets
                if quota.requests_per_day is not None
            ]
        )

    async def used(self, scope: Scope, name: str, unit: Unit) -> int:
        """What `name` has used of its current `unit` window."""
        return await self.counters.get(_key(unit, Window.at(self.clock()), scope, name))
