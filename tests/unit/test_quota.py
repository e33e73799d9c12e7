"""Quota arithmetic on an injected clock: calendar windows in UTC (a day resets at 00:00, a
month on the 1st, December into January, leap days), requests/day counted before a request
runs and rolled back when another quota refuses it, token quotas refusing once used up, a
quota of 0, and bad values refused."""

from __future__ import annotations

import sys
from datetime import datetime, timezone

import pytest

from llmhost.errors import ConfigError
from llmhost.security.quota import NO_QUOTA, Admission, Quota, QuotaExceeded, Quotas, Window


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, text: str) -> None:
        self.now = ts(text)

    def __call__(self) -> float:
        return self.now

    def set(self, text: str) -> None:
        self.now = ts(text)


@pytest.mark.parametrize(
    ("moment", "day", "month", "day_end", "month_end"),
    [
        ("2026-11-27 13:05:00", "2026-11-27", "2026-11", "2026-11-28", "2026-12-01"),
        ("2026-11-30 23:59:59", "2026-11-30", "2026-11", "2026-12-01", "2026-12-01"),
        ("2026-12-31 23:59:59.999", "2026-12-31", "2026-12", "2027-01-01", "2027-01-01"),
        ("2028-02-28 12:00:00", "2028-02-28", "2028-02", "2028-02-29", "2028-03-01"),
        ("2028-02-29 00:00:00", "2028-02-29", "2028-02", "2028-03-01", "2028-03-01"),
        ("2027-01-01 00:00:00", "2027-01-01", "2027-01", "2027-01-02", "2027-02-01"),
    ],
)
def test_windows_are_utc_calendar_days_and_months(moment, day, month, day_end, month_end):
    w = Window.at(ts(moment))
    assert (w.day, w.month) == (day, month)
    assert w.day_end == ts(day_end + " 00:00:00")
    assert w.month_end == ts(month_end + " 00:00:00")


async def test_requests_per_day_resets_at_midnight_utc():
    clock = Clock("2026-11-27 23:59:58")
    q = Quotas(clock=clock)
    target = [("key", "k1", Quota(requests_per_day=2))]
    assert isinstance(await q.admit(target), Admission)
    assert isinstance(await q.admit(target), Admission)
    refused = await q.admit(target)
    assert isinstance(refused, QuotaExceeded)
    assert (refused.scope, refused.name, refused.unit, refused.limit) == (
        "key",
        "k1",
        "requests/day",
        2,
    )
    assert refused.resets_at == ts("2026-11-28 00:00:00")
    assert refused.retry_after == 2.0
    assert "key 'k1'" in refused.message and "2 requests/day" in refused.message
    assert "resets at 2026-11-28T00:00:00Z" in refused.message
    assert await q.used("key", "k1", "requests/day") == 2  # the refusal is not counted
    clock.set("2026-11-28 00:00:00")
    assert isinstance(await q.admit(target), Admission)
    assert await q.used("key", "k1", "requests/day") == 1


async def test_tokens_refused_once_used_up_and_charged_to_the_day_admitted():
    clock = Clock("2026-11-27 10:00:00")
    q = Quotas(clock=clock)
    target = [("user", "alice", Quota(tokens_per_day=10))]
    first = await q.admit(target)
    assert isinstance(first, Admission)
    await q.charge(first, 7)
    second = await q.admit(target)  # 7 < 10: let through, may go past the quota
    assert isinstance(second, Admission)
    clock.set("2026-11-28 00:00:05")  # the second request ends after midnight
    await q.charge(second, 5)
    assert await q.used("user", "alice", "tokens/day") == 0  # the new day starts clean
    clock.set("2026-11-27 23:00:00")
    refused = await q.admit(target)
    assert isinstance(refused, QuotaExceeded) and refused.unit == "tokens/day"
    assert await q.used("user", "alice", "tokens/day") == 12
    assert refused.retry_after == 3600


async def test_month_quota_resets_on_the_first():
    clock = Clock("2026-12-31 20:00:00")
    q = Quotas(clock=clock)
    target = [("model", "llama3:8b", Quota(tokens_per_month=100, tokens_per_day=1000))]
    a = await q.admit(target)
    assert isinstance(a, Admission)
    await q.charge(a, 100)
    clock.set("2026-12-31 23:59:59")
    refused = await q.admit(target)
    assert isinstance(refused, QuotaExceeded)
    assert refused.unit == "tokens/month" and refused.resets_at == ts("2027-01-01 00:00:00")
    assert "model 'llama3:8b' has 100 tokens/month" in refused.message
    clock.set("2027-01-01 00:00:00")
    assert isinstance(await q.admit(target), Admission)


async def test_a_refusal_takes_back_what_the_request_counted():
    q = Quotas(clock=Clock("2026-11-27 10:00:00"))
    targets = [
        ("key", "k1", Quota(requests_per_day=10)),
        ("user", "bob", Quota(requests_per_day=1)),
    ]
    assert isinstance(await q.admit(targets), Admission)
    for _ in range(3):
        refused = await q.admit(targets)
        assert isinstance(refused, QuotaExceeded) and refused.scope == "user"
    assert await q.used("key", "k1", "requests/day") == 1
    assert await q.used("user", "bob", "requests/day") == 1


async def test_zero_refuses_everything_and_unset_refuses_nothing():
    q = Quotas(clock=Clock("2026-11-27 10:00:00"))
    for quota, unit in (
        (Quota(requests_per_day=0), "requests/day"),
        (Quota(tokens_per_day=0), "tokens/day"),
        (Quota(tokens_per_month=0), "tokens/month"),
    ):
        refused = await q.admit([("key", "z", quota)])
        assert isinstance(refused, QuotaExceeded) and refused.unit == unit
    assert not NO_QUOTA.is_set and Quota(requests_per_day=0).is_set
    for _ in range(5):
        assert isinstance(await q.admit([("key", "free", NO_QUOTA)]), Admission)


def test_names_cannot_collide_across_scopes():
    q = Quotas()
    from llmhost.security.quota import _key

    w = Window.at(0)
    keys = {
        _key("tokens/day", w, "user", "a"),
        _key("tokens/day", w, "key", "a"),
        _key("tokens/day", w, "user", "a:tokens/day"),
        _key("requests/day", w, "user", "a"),
    }
    assert len(keys) == 4 and q.refused == 0


@pytest.mark.parametrize("bad", [-1, -100, 1.5, "10", True, 1 << 60])
def test_bad_quota_values_are_refused(bad):
    with pytest.raises(ConfigError):
        Quota(tokens_per_day=bad)


def test_a_keys_quota_is_stored_and_reaches_its_principal(tmp_path):
    import sqlite3

    from llmhost.security.auth import KeyStore

    path = tmp_path / "keys.db"
    old = sqlite3.connect(path)  # a keys.db from before quotas, with a key in it
    old.execute(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, "
        "user_id TEXT NOT NULL, role TEXT NOT NULL, created REAL NOT NULL, expires REAL, "
        "revoked REAL, rpm INTEGER, tpm INTEGER, models TEXT)"
    )
    old.commit()
    old.close()
    store = KeyStore(path)
    plain, _ = store.create("old")
    capped, info = store.create("new", quota=Quota(tokens_per_day=0, requests_per_day=7))
    store.close()
    store = KeyStore(path)
    assert store.authenticate(plain).quota == NO_QUOTA
    principal = store.authenticate(capped)
    assert principal.quota == Quota(tokens_per_day=0, requests_per_day=7) == info.quota
    assert [k.quota for k in store.list()] == [NO_QUOTA, info.quota]
    store.close()


async def test_a_refund_takes_back_the_request_only():
    q = Quotas(clock=Clock("2026-11-27 10:00:00"))
    targets = [("key", "k", Quota(requests_per_day=1, tokens_per_day=100))]
    admitted = await q.admit(targets)
    assert isinstance(admitted, Admission)
    await q.charge(admitted, 30)
    await q.refund(admitted)
    assert await q.used("key", "k", "requests/day") == 0
    assert await q.used("key", "k", "tokens/day") == 30
    assert isinstance(await q.admit(targets), Admission)


async def test_memory_counters_forget_old_windows_and_stay_bounded():
    clock = Clock("2026-11-27 10:00:00")
    q = Quotas(clock=clock)
    full = Quota(tokens_per_day=100, tokens_per_month=1000, requests_per_day=10)
    for i in range(50):
        admitted = await q.admit([("key", f"k{i}", full)])
        assert isinstance(admitted, Admission)
        await q.charge_soon(admitted, 3)
    held = len(q.counters._values)
    assert held == 150  # per key: requests/day, tokens/day, tokens/month
    clock.set("2026-11-29 10:00:00")  # the 27th's counters are a day past their window
    await q.admit([("key", "k0", full)])
    assert len(q.counters._values) == 50 + 1  # the month's stay, and k0's requests today
    assert await q.used("key", "k0", "tokens/month") == 3
    clock.set("2027-01-03 00:00:00")
    await q.admit([("key", "k0", full)])
    assert len(q.counters._values) == 1


def test_a_redis_url_without_the_client_or_not_redis_is_a_config_error(monkeypatch):
    import redis  # noqa: F401 (imported first: the check must not trust an earlier import)

    with pytest.raises(ConfigError, match="not a Redis URL"):
        Quotas("memory://")
    # a bad URL is named without its password, wherever the library's message repeats it
    for bad in (
        "redis+foo://user:s3cret@h:6379",
        "redis://user:s3cret@h:notaport",
        "memory://user:s3cret@h",
        "redis+sentinel://:s3cret@h:26379",
    ):
        with pytest.raises(ConfigError) as err:
            Quotas(bad)
        assert "s3cret" not in str(err.value) and "***" in str(err.value), err.value
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'llmhost\[redis\]'") as err:
        Quotas("redis://:secret@127.0.0.1:1/0")
    assert "secret" not in str(err.value)  # the URL's password is not repeated
