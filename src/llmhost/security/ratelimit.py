"""Rate limits on the `limits` library's moving windows (exact: no window-edge bursts): one
per instance (requests/second, the guide's 100 QPS) and one per principal (requests/minute and
tokens/minute; a key's or token's own figures win over the server defaults). Tokens are counted
from the actual usage once a response ends; a principal whose token budget is spent is refused
until the window frees it. In memory by default; with a Redis URL, every instance pointed at
the same Redis shares the per-principal and per-model budgets and the failed-login counts,
while the per-instance limit stays in each instance's memory: it is that instance's capacity.
A request's principal budgets are read together (one wait on Redis) and then counted."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from limits.util import WindowStats

from llmhost.security.auth import Principal
from llmhost.security.redis_store import redis_storage


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int = 0  # of the tightest limit that applied; 0 = none
    remaining: int = 0
    reset_after: float = 0.0  # seconds until that window frees capacity
    reason: str = ""
    scope: str = ""  # which limit refused: instance, user_requests or user_tokens

    def headers(self) -> dict[str, str]:
        if not self.limit:
            return {}
        out = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(max(0, math.ceil(self.reset_after))),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.reset_after)))
        return out


class RateLimiter:
    def __init__(
        self,
        *,
        instance_rps: int = 100,
        default_rpm: int = 0,
        default_tpm: int = 0,
        auth_failures_per_minute: int = 0,
        redis_url: str | None = None,
        namespace: str = "llmhost",
    ):
        memory = MovingWindowRateLimiter(storage_from_string("async+memory://"))
        self.shared = bool(redis_url)
        self.storage = redis_storage(redis_url, namespace) if redis_url else memory.storage
        # the principals', models' and clients' windows: in Redis when one is set
        self.window = MovingWindowRateLimiter(self.storage) if redis_url else memory
        # the instance's own window is always in this process: it is this instance's capacity
        self.local = memory
        self.instance = RateLimitItemPerSecond(instance_rps) if instance_rps > 0 else None
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.auth_failures = (
            RateLimitItemPerMinute(auth_failures_per_minute)
            if auth_failures_per_minute > 0
            else None
        )
        self.rejected = 0
        self._counted = _Counted()

    def _refused(
        self, item: RateLimitItem, stats: WindowStats, reason: str, scope: str
    ) -> Decision:
        self.rejected += 1
        reset = max(0.0, stats.reset_time - time.time())
        return Decision(False, item.amount, 0, reset, reason, scope)

    async def _refusal(self, item: RateLimitItem, key: str, reason: str, scope: str) -> Decision:
        return self._refused(item, await self.window.get_window_stats(item, key), reason, scope)

    async def _read(self, *windows: tuple[RateLimitItem, str]) -> list[WindowStats]:
        """The stats of several windows; from Redis, all in one wait (their round trips
        overlap)."""
        reads = [self.window.get_window_stats(item, key) for item, key in windows]
        if self.shared and len(reads) > 1:
            return list(await asyncio.gather(*reads))
        return [await read for read in reads]

    async def admit(self, principal: Principal) -> Decision:
        """Count one request against every limit that applies, or refuse it."""
        user = f"user:{principal.user_id}"
        rpm = principal.rpm or self.default_rpm
        tpm = principal.tpm or self.default_tpm
        rpm_item = RateLimitItemPerMinute(rpm) if rpm > 0 else None
        tpm_item = RateLimitItemPerMinute(tpm) if tpm > 0 else None
        # Read the principal's budgets before taking an instance slot, so a refused request
        # does not use up the instance's capacity.
        windows = [(rpm_item, user)] if rpm_item is not None else []
        if tpm_item is not None:
            windows.append((tpm_item, "tokens:" + user))
        seen = self._counted.open(user)
        try:
            read = iter(await self._read(*windows))
            requests = (rpm_item, next(read)) if rpm_item is not None else None
            tokens = (tpm_item, next(read)) if tpm_item is not None else None
            return await self._count(principal.user_id, requests, tokens, seen)
        finally:
            self._counted.close(user)

    async def _count(
        self,
        user_id: str,
        requests: tuple[RateLimitItem, WindowStats] | None,
        tokens: tuple[RateLimitItem, WindowStats] | None,
        seen: int,
    ) -> Decision:
        """Counts a request whose user's windows read `requests` and `tokens` (None: no such
        limit), `seen` being how many of that user's this instance had counted then."""
        user = f"user:{user_id}"
        if requests is not None and requests[1].remaining < 1:
            item, stats = requests
            return self._refused(
                item, stats, f"{user_id}: {item.amount} requests/min", "user_requests"
            )
        if tokens is not None and tokens[1].remaining < 1:
            item, stats = tokens
            return self._refused(item, stats, f"{user_id}: {item.amount} tokens/min", "user_tokens")
        best = Decision(True)
        if self.instance is not None:
            taken = await self.local.hit(self.instance, "instance")
            stats = await self.local.get_window_stats(self.instance, "instance")
            if not taken:
                reason = f"this instance takes {self.instance.amount}/s"
                return self._refused(self.instance, stats, reason, "instance")
            best = _allowed(self.instance, stats)
        if requests is not None:
            item, mine = requests
            if not await self.window.hit(item, user):
                return await self._refusal(
                    item, user, f"{user_id}: {item.amount}/min", "user_requests"
                )
            # what was left less this request and those of this user this instance counted
            # since the reading (another instance's are not known: the header is advisory,
            # the refusal is exact)
            since = self._counted.hit(user) - seen
            left = WindowStats(mine.reset_time, max(0, mine.remaining - since))
            if not best.limit or left.remaining < best.remaining:
                best = _allowed(item, left)
        return best

    async def admit_model(self, model_id: str, rpm: int) -> Decision:
        """Count one request against a model's own requests/minute (all principals together),
        or refuse it."""
        item = RateLimitItemPerMinute(rpm)
        key = f"model:{model_id}"
        if not await self.window.hit(item, key):
            return await self._refusal(item, key, f"{model_id}: {rpm} requests/min", "model")
        return await self._stats(item, key)

    async def auth_failures_exceeded(self, client: str) -> Decision | None:
        """A refusal when `client` (an IP address) failed authentication too often in the last
        minute, checked before its credentials are: a flood of bad keys costs nothing."""
        if self.auth_failures is None:
            return None
        key = "authfail:" + client
        if await self.window.test(self.auth_failures, key):
            return None
        return await self._refusal(
            self.auth_failures,
            key,
            f"{self.auth_failures.amount} failures/min per client",
            "auth_failures",
        )

    async def note_auth_failure(self, client: str) -> None:
        if self.auth_failures is not None:
            await self.window.hit(self.auth_failures, "authfail:" + client)

    async def _stats(self, item: RateLimitItem, key: str) -> Decision:
        return _allowed(item, await self.window.get_window_stats(item, key))

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Count the tokens a finished request used against the principal's tokens/minute."""
        tpm = principal.tpm or self.default_tpm
        if tpm > 0 and tokens > 0:
            item = RateLimitItemPerMinute(tpm)
            key = f"tokens:user:{principal.user_id}"
            if await self.window.hit(item, key, cost=tokens):
                return
            # Consume what is left even when the request used more than remains.
            stats = await self.window.get_window_stats(item, key)
            cost = min(tokens, stats.remaining) if stats.remaining > 0 else 0
            if cost:
                await self.window.hit(item, key, cost=cost)


def _allowed(item: RateLimitItem, stats: WindowStats) -> Decision:
    return Decision(True, item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()))


class _Counted:
    """How many requests of each user this instance has counted, kept only while one of that
    user's requests is between reading its window and being counted: what the reading, older
    by then, does not show."""

    def __init__(self) -> None:
        self._users: dict[str, list[int]] = {}  # user: [requests between, counted]

    def open(self, user: str) -> int:
        entry = self._users.setdefault(user, [0, 0])
        entry[0] += 1
        return entry[1]

    def hit(self, user: str) -> int:
        entry = self._users[user]
        entry[1] += 1
        return entry[1]

    def close(self, user: str) -> None:
        entry = self._users[user]
        entry[0] -= 1
        if not entry[0]:
            del self._users[user]
