"""Key rotation: a new secret for the same key, the replaced one valid for a grace period on
an injected clock, and never past it, not even from the authenticator's row cache."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from llmhost.errors import AuthenticationError, ConfigError, NotFound
from llmhost.security.auth import KeyStore

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def keys(tmp_path, clock):
    store = KeyStore(tmp_path / "keys.db", clock=clock)
    yield store
    store.close()


def test_both_secrets_work_during_the_grace_and_only_the_new_one_after(keys, clock):
    old, info = keys.create("alice", "admin", expires_in=30 * 86400, rpm=7, tpm=99, models=["m"])
    done = keys.rotate(info.key_id, 24 * HOUR)
    new = done.key
    assert new != old and new.startswith(f"llmh_{info.key_id}_")
    assert done.info.old_secret_until == clock.now + 24 * HOUR and not done.cut_short
    for key in (old, new):
        p = keys.authenticate(key)
        assert (p.user_id, p.role, p.rpm, p.tpm, p.models, p.key_id) == (
            "alice",
            "admin",
            7,
            99,
            ("m",),
            info.key_id,
        )
    (listed,) = keys.list()
    assert listed.expires == info.expires and listed.created == info.created
    assert listed.in_grace(clock.now) and listed.state(clock.now) == "active"
    clock.now += 24 * HOUR - 1
    assert keys.authenticate(old).user_id == "alice"
    clock.now += 1  # the grace ends here; the cached row must not let the old secret in
    with pytest.raises(AuthenticationError, match="rotated and its grace period is over"):
        keys.authenticate(old)
    assert keys.authenticate(new).user_id == "alice"
    assert not keys.list()[0].in_grace(clock.now)


def test_no_grace_ends_the_old_secret_at_once(keys):
    old, info = keys.create("alice")
    new = keys.rotate(info.key_id, 0).key
    with pytest.raises(AuthenticationError):
        keys.authenticate(old)
    assert keys.authenticate(new).user_id == "alice"
    assert keys.list()[0].old_secret_until is None


def test_rotating_again_ends_the_older_secret_and_graces_the_newer(keys, clock):
    first, info = keys.create("alice")
    second = keys.rotate(info.key_id, HOUR).key
    clock.now += 60
    again = keys.rotate(info.key_id, 2 * HOUR)
    assert again.cut_short and again.info.old_secret_until == clock.now + 2 * HOUR
    with pytest.raises(AuthenticationError):
        keys.authenticate(first)
    assert keys.authenticate(second).user_id == "alice"
    assert keys.authenticate(again.key).user_id == "alice"
    clock.now += 2 * HOUR
    with pytest.raises(AuthenticationError):
        keys.authenticate(second)
    # past the grace, a rotation cuts nothing short
    assert not keys.rotate(info.key_id, HOUR).cut_short


def test_revoking_during_the_grace_ends_both_secrets(keys):
    old, info = keys.create("alice")
    new = keys.rotate(info.key_id, HOUR).key
    assert keys.authenticate(old).user_id == "alice"  # cached now
    revoked = keys.revoke(info.key_id)
    assert revoked.old_secret_until is None  # the replaced digest is dropped, not kept
    with pytest.raises(AuthenticationError, match="revoked"):
        keys.authenticate(new)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        keys.authenticate(old)


def test_rotation_elsewhere_is_seen_by_a_server_with_cached_rows(tmp_path, clock):
    server = KeyStore(tmp_path / "keys.db", clock=clock)
    cli = KeyStore(tmp_path / "keys.db", clock=clock)
    old, info = cli.create("alice")
    assert server.authenticate(old).user_id == "alice"
    new = cli.rotate(info.key_id, HOUR).key
    assert server.authenticate(new).user_id == "alice"
    assert server.authenticate(old).user_id == "alice"
    clock.now += HOUR  # no write to keys.db: only the clock tells the cache the grace is over
    with pytest.raises(AuthenticationError, match="grace period is over"):
        server.authenticate(old)
    cli.rotate(info.key_id, 0)
    with pytest.raises(AuthenticationError):
        server.authenticate(new)
    server.close()
    cli.close()


def test_what_cannot_be_rotated(keys, clock):
    with pytest.raises(NotFound):
        keys.rotate("nope", HOUR)
    _, info = keys.create("alice", expires_in=HOUR)
    for bad in (-1.0, float("nan"), 31 * 86400.0):
        with pytest.raises(ConfigError, match="grace"):
            keys.rotate(info.key_id, bad)
    clock.now += HOUR
    with pytest.raises(ConfigError, match="expired"):
        keys.rotate(info.key_id, HOUR)
    _, other = keys.create("bob")
    keys.revoke(other.key_id)
    with pytest.raises(ConfigError, match="revoked"):
        keys.rotate(other.key_id, HOUR)


def test_a_wrong_secret_is_refused_during_a_grace(keys):
    _, info = keys.create("alice")
    keys.rotate(info.key_id, HOUR)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        keys.authenticate(f"llmh_{info.key_id}_wrong")


def test_a_keys_db_from_before_rotation_gains_it_in_place(tmp_path, clock):
    path = tmp_path / "keys.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, "
        "user_id TEXT NOT NULL, role TEXT NOT NULL, created REAL NOT NULL, expires REAL, "
        "revoked REAL, rpm INTEGER, tpm INTEGER, models TEXT)"
    )
    digest = hashlib.sha256(b"oldsecret").hexdigest()
    db.execute(
        "INSERT INTO api_keys VALUES ('abc', ?, 'old', 'user', 1.0, NULL, NULL, 5, NULL, NULL)",
        (digest,),
    )
    db.commit()
    db.close()
    keys = KeyStore(path, clock=clock)
    (old,) = keys.list()
    assert (old.user_id, old.rpm, old.rotated, old.old_secret_until) == ("old", 5, None, None)
    assert keys.authenticate("llmh_abc_oldsecret").user_id == "old"
    new = keys.rotate("abc", HOUR).key
    assert keys.authenticate(new).rpm == 5
    assert keys.authenticate("llmh_abc_oldsecret").user_id == "old"
    keys.create("new")
    assert [k.user_id for k in keys.list()] == ["old", "new"]
    keys.close()
    # opened again, nothing is added twice and the rotation is still there
    again = KeyStore(path, clock=clock)
    assert again.list()[0].in_grace(clock.now)
    again.close()
    dump = "\n".join(sqlite3.connect(path).iterdump())
    assert "oldsecret" not in dump and new.rsplit("_", 1)[1] not in dump
