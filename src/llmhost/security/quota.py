"""Quotas over calendar windows in UTC: tokens per day, tokens per month and requests per day,
per API key, per user and per model (all principals together). A day's counters reset at
00:00 UTC, a month's on the 1st. A request is counted (requests/day) before it runs and
refused once a token budget is used up; its tokens are charged from its usage when it ends.

Counters are plain integers in the `limits` library's storage, the rate limits' own: in memory
by default, or in Redis so that every instance pointed at it shares one budget. Each counter's
key names its window (`2026-11-27`, `2026-11`), so a new window starts from zero exactly; the
expiry only clears old windows away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from limits.aio.storage import Storage
from limits.storage import storage_from_string

from llmhost.errors import ConfigError

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
    # The name goes last: it is the only free-form part, so no two counters share a key.
    return f"quota:{unit}:{window.label(unit)}:{scope}:{name}"


class Quotas:
    """The counters of every quota, checked and charged by the api layer."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str = "llmhost",
        clock: Callable[[], float] = time.time,
    ):
        if redis_url:
            uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
            store = storage_from_string(uri, key_prefix=namespace)
        else:
            store = storage_from_string("async+memory://")
        if not isinstance(store, Storage):
            raise ConfigError(f"{redis_url} is not an asynchronous limits storage")
        self.storage: Storage = store
        self.remote = bool(redis_url)
        self.clock = clock
        self.refused = 0

    def _expiry(self, window: Window, unit: Unit, now: float) -> int:
        return int(window.end(unit) - now) + _GRACE

    def _refusal(
        self, scope: Scope, name: str, unit: Unit, limit: int, window: Window, now: float
    ) -> QuotaExceeded:
        self.refused += 1
        end = window.end(unit)
        return QuotaExceeded(scope, name, unit, limit, end, max(1.0, end - now))

    async def _each(self, calls: list[Awaitable[int]]) -> list[int]:
        # Redis: every command of a step in flight at once, one round trip rather than one
        # each; in memory, one after another (tasks would cost more than the calls).
        if self.remote:
            return list(await asyncio.gather(*calls))
        return [await call for call in calls]

    async def admit(self, targets: Sequence[Target]) -> Admission | QuotaExceeded:
        """Count one request against every requests/day quota of `targets` and check their
        token quotas; on a refusal nothing stays counted."""
        now = self.clock()
        window = Window.at(now)
        todo = tuple(t for t in targets if t[2].is_set)
        tokens = [(s, n, u, lim) for s, n, q in todo for u, lim in q.token_limits()]
        used = await self._each([self.storage.get(_key(u, window, s, n)) for s, n, u, _ in tokens])
        for (scope, name, unit, limit), spent in zip(tokens, used, strict=True):
            if spent >= limit:  # 0 refuses at once
                return self._refusal(scope, name, unit, limit, window, now)
        counted = [(s, n, q.requests_per_day) for s, n, q in todo if q.requests_per_day is not None]
        expiry = self._expiry(window, "requests/day", now)
        keys = [_key("requests/day", window, s, n) for s, n, _ in counted]
        after = await self._each([self.storage.incr(key, expiry) for key in keys])
        for (scope, name, most), count in zip(counted, after, strict=True):
            if most is not None and count > most:
                # This request never runs, so it uses no one's budget (Redis storage has no
                # decr: a negative increment does the same on both).
                await self._each([self.storage.incr(key, expiry, -1) for key in keys])
                return self._refusal(scope, name, "requests/day", most, window, now)
        return Admission(window, todo)

    async def charge(self, admission: Admission, tokens: int) -> None:
        """Charge the tokens a finished request used to the windows it was admitted in (a
        stream that ends after midnight still pays into the day it started)."""
        if tokens <= 0 or not admission.targets:
            return
        window, now = admission.window, self.clock()
        await self._each(
            [
                self.storage.incr(
                    _key(unit, window, scope, name),
                    max(1, self._expiry(window, unit, now)),
                    tokens,
                )
                for scope, name, quota in admission.targets
                for unit, _limit in quota.token_limits()
            ]
        )

    async def refund(self, admission: Admission) -> None:
        """Take back the request an admission counted, for a request that never ran (its
        model could not be leased)."""
        window, now = admission.window, self.clock()
        expiry = self._expiry(window, "requests/day", now)
        await self._each(
            [
                self.storage.incr(_key("requests/day", window, scope, name), expiry, -1)
                for scope, name, quota in admission.targets
                if quota.requests_per_day is not None
            ]
        )

    async def used(self, scope: Scope, name: str, unit: Unit) -> int:
        """What `name` has used of its current `unit` window."""
        return int(await self.storage.get(_key(unit, Window.at(self.clock()), scope, name)))
