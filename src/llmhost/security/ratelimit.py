"""Rate limits on the `limits` library's moving windows (exact: no window-edge bursts): one
per instance (requests/second, the guide's 100 QPS) and one per principal (requests/minute and
tokens/minute; a key's or token's own figures win over the server defaults). Tokens are counted
from the actual usage once a response ends; a principal whose token budget is spent is refused
until the window frees it. In memory by default; with a Redis URL, every instance pointed at
the same Redis shares the per-principal budgets."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

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
        self.storage = (
            redis_storage(redis_url, namespace)
            if redis_url
            else storage_from_string("async+memory://")
        )
        self.window = MovingWindowRateLimiter(self.storage)
        self.instance = RateLimitItemPerSecond(instance_rps) if instance_rps > 0 else None
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.auth_failures = (
            RateLimitItemPerMinute(auth_failures_per_minute)
            if auth_failures_per_minute > 0
            else None
        )
        self.rejected = 0

    async def _refusal(self, item: RateLimitItem, key: str, reason: str, scope: str) -> Decision:
        stats = await self.window.get_window_stats(item, key)
        self.rejected += 1
        reset = max(0.0, stats.reset_time - time.time())
        return Decision(False, item.amount, 0, reset, reason, scope)

    async def admit(self, principal: Principal) -> Decision:
        """Count one request against every limit that applies, or refuse it."""
        user = f"user:{principal.user_id}"
        rpm = principal.rpm or self.default_rpm
        tpm = principal.tpm or self.default_tpm
        rpm_item = RateLimitItemPerMinute(rpm) if rpm > 0 else None
        tpm_item = RateLimitItemPerMinute(tpm) if tpm > 0 else None
        # Check the principal's budgets before taking an instance slot, so a refused request
        # does not use up the instance's capacity.
        if rpm_item is not None and not await self.window.test(rpm_item, user):
            return await self._refusal(
                rpm_item, user, f"{principal.user_id}: {rpm} requests/min", "user_requests"
            )
        if tpm_item is not None and not await self.window.test(tpm_item, "tokens:" + user):
            return await self._refusal(
                tpm_item, "tokens:" + user, f"{principal.user_id}: {tpm} tokens/min", "user_tokens"
            )
        best = Decision(True)
        if self.instance is not None:
            if not await self.window.hit(self.instance, "instance"):
                return await self._refusal(
                    self.instance,
                    "instance",
                    f"this instance takes {self.instance.amount}/s",
                    "instance",
                )
            best = await self._stats(self.instance, "instance")
        if rpm_item is not None:
            if not await self.window.hit(rpm_item, user):
                return await self._refusal(
                    rpm_item, user, f"{principal.user_id}: {rpm}/min", "user_requests"
                )
            mine = await self._stats(rpm_item, user)
            if not best.limit or mine.remaining < best.remaining:
                best = mine
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
        stats = await self.window.get_window_stats(item, key)
        return Decision(
            True, item.amount, stats.remaining, max(0.0, stats.reset_time - time.time())
        )

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Count the tokens a finished request used against the principal's tokens/minute."""
        tpm = principal.tpm or self.default_tpm
        if tpm > 0 and tokens > 0:
            item = RateLimitItemPerMinute(tpm)
            # Consume what is left even when the request used more than remains.
            stats = await self.window.get_window_stats(item, f"tokens:user:{principal.user_id}")
            cost = min(tokens, stats.remaining) if stats.remaining > 0 else 0
            if cost:
                await self.window.hit(item, f"tokens:user:{principal.user_id}", cost=cost)
