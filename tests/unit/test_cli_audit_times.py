"""`llmhost audit` times and durations: "7d ago" as the README writes it, the forms accepted
before (7d, 7 d, ISO times), and a duration flag never taking a bare number for seconds."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from llmhost.audit.store import AuditRecord, SqliteAuditStore
from llmhost.cli.audit import parse_when
from llmhost.cli.main import app
from llmhost.errors import ConfigError

DAY = 86400.0


@pytest.fixture
def home(tmp_path):
    now = time.time()
    s = SqliteAuditStore(tmp_path / "audit.db")
    s.append(
        [
            AuditRecord(
                ts=ts, request_id=rid, client_ip="10.0.0.1", user_id="alice", route="/", status=200
            )
            for rid, ts in (("old", now - 10 * DAY), ("new", now - 2 * DAY))
        ]
    )
    s.close()
    return tmp_path


def run(home, *args):
    return CliRunner().invoke(app, ["audit", *args], env={"LLMHOST_HOME": str(home)})


@pytest.mark.parametrize("since", ["7d ago", "7d", "7 d", "1w ago", "168h AGO", "6.5d ago"])
def test_search_since_a_duration_ago(home, since):
    r = run(home, "search", "--since", since, "--json")
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["request_id"] for line in r.output.splitlines()] == ["new"]


def test_iso_times_still_work():
    assert parse_when("2026-11-01") == 1793491200.0
    assert parse_when("2026-11-01T12:00+01:00") == 1793491200.0 + 11 * 3600
    assert parse_when(None) is None
    assert abs(parse_when("1h ago") - (time.time() - 3600)) < 5


@pytest.mark.parametrize("bad", ["ago", "7 ago d", "7x ago", "yesterday", "7", "7 ago"])
def test_bad_times_are_refused(home, bad):
    with pytest.raises(ConfigError, match="bad time"):
        parse_when(bad)
    r = run(home, "search", "--since", bad)
    assert isinstance(r.exception, ConfigError) and "bad time" in r.exception.message


def test_purge_wants_a_unit(home):
    r = run(home, "purge", "--older-than", "5")
    assert isinstance(r.exception, ConfigError)
    assert r.exception.message.startswith("--older-than: not a duration")
    r = run(home, "purge", "--older-than", "5d")
    assert r.exit_code == 0 and "removed 1 records older than 5d" in r.output
