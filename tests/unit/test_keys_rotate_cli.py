"""`llmhost keys rotate ID --grace 24h`: the new key printed once, when the old secret stops,
and `keys list` showing a rotation in its grace."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmhost.cli.keys import keys_app
from llmhost.errors import AuthenticationError, ConfigError, NotFound
from llmhost.security.auth import KeyStore


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")  # a table row on one line
    return tmp_path


def keys(*args: str):
    return CliRunner().invoke(keys_app, list(args))


def test_rotate_prints_the_new_key_once_and_list_shows_the_grace(home):
    store = KeyStore(home / "keys.db")
    old, info = store.create("dave", rpm=60)
    r = keys("rotate", info.key_id, "--grace", "24h")
    assert r.exit_code == 0, r.output
    new = r.stdout.strip()
    assert new.startswith(f"llmh_{info.key_id}_") and new != old
    assert "old secret works until" in r.stderr and "cannot be shown again" in r.stderr
    assert store.authenticate(old).user_id == store.authenticate(new).user_id == "dave"

    table = keys("list")
    assert "old secret until" in table.stdout
    (listed,) = json.loads(keys("list", "--json").stdout)
    assert listed["state"] == "active" and listed["rpm"] == 60
    assert listed["old_secret_until"] - listed["rotated"] == pytest.approx(86400)
    listing = keys("list", "--json").stdout + table.stdout
    assert new.rsplit("_", 1)[1] not in listing and old.rsplit("_", 1)[1] not in listing

    r = keys("rotate", info.key_id, "--grace", "0")
    assert r.exit_code == 0, r.output
    assert "old secret stopped working now" in r.stderr
    assert "earlier rotation" in r.stderr  # the first secret, still in its grace, ended too
    newest = r.stdout.strip()
    for gone in (old, new):
        with pytest.raises(AuthenticationError):
            store.authenticate(gone)
    assert store.authenticate(newest).user_id == "dave"
    assert "old secret until" not in keys("list").stdout
    store.close()


def test_rotate_refuses_a_bare_number_and_unknown_ids(home):
    store = KeyStore(home / "keys.db")
    old, info = store.create("dave")
    r = keys("rotate", info.key_id, "--grace", "24")
    assert isinstance(r.exception, ConfigError) and "--grace" in str(r.exception)
    assert isinstance(keys("rotate", "nope", "--grace", "1h").exception, NotFound)
    assert keys("rotate", info.key_id).exit_code == 2  # the grace is asked for, not assumed
    assert store.authenticate(old).user_id == "dave"  # nothing was rotated
    store.close()


def test_key_changes_from_the_cli_are_audited(home):
    """create, rotate and revoke from the shell each leave an audit record naming the system
    user and the key, in the same chained log the server writes (it still verifies)."""
    from llmhost.audit.store import open_store
    from llmhost.config import load_settings

    created = keys("create", "--user", "erin", "--role", "admin")
    assert created.exit_code == 0, created.output
    key_id = created.stdout.strip().split("_")[1]
    assert keys("rotate", key_id, "--grace", "1h").exit_code == 0
    assert keys("revoke", key_id).exit_code == 0
    assert keys("revoke", "nope").exit_code != 0  # refused: nothing to record
    s = load_settings()
    store = open_store(None, s.audit_db, key_file=s.audit_key_path, head_file=s.audit_head_path)
    try:
        found = list(store.search())
        assert store.verify().ok
    finally:
        store.close()
    routes = [r.route for r in found]
    assert routes == [
        f"llmhost keys create {key_id} (user erin, role admin)",
        f"llmhost keys rotate {key_id} (user erin, grace 3600 s)",
        f"llmhost keys revoke {key_id} (user erin)",
    ]
    assert all(r.user_id.startswith("cli:") and r.status == 200 for r in found)
    assert all(r.client_ip == "local" and r.request_id.startswith("cli-") for r in found)
    secret = created.stdout.strip().rsplit("_", 1)[1]
    assert not any(secret in repr(r) for r in found)


def test_an_audit_log_that_cannot_be_written_is_an_error_not_silence(home, monkeypatch):
    (home / "audit.key").write_text("not a key")  # unreadable: the store refuses to write
    created = keys("create", "--user", "erin")
    assert created.exit_code == 1
    assert created.stdout.startswith("llmh_")  # the key exists: its secret is still shown
    assert "audit record could not be written" in str(created.exception)
    monkeypatch.setenv("LLMHOST_AUDIT", "false")
    assert keys("create", "--user", "frank").exit_code == 0  # audit off: nothing to write
