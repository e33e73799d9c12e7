"""`llmhost serve`: its options that mirror settings say what `Settings` says, a flag given wins
over the environment and one not given leaves it its say, and a serve that cannot start fails
with just its error, before any banner or warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from llmhost.cli import serve as serve_cli
from llmhost.cli.main import app
from llmhost.cli.serve import NOT_SETTINGS
from llmhost.config import Settings
from llmhost.errors import ConfigError
from llmhost.ops import serve as ops


def serve_options() -> list:
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return [p for p in command.params if p.param_type_name == "option" and p.name != "help"]


def test_every_setting_flag_has_the_settings_help_and_default():
    mirrored = [p for p in serve_options() if p.name not in NOT_SETTINGS]
    assert len(mirrored) >= 30
    for p in mirrored:
        field = Settings.model_fields[p.name]  # KeyError: a flag that is no setting
        assert field.description, p.name
        assert p.help == field.description or p.help.startswith(field.description + " "), p.name
        assert p.default is None, p.name  # not given: the environment or config.toml decides
        if field.default_factory is not None:
            # computed where it runs, so the description says how
            assert p.show_default is False, p.name
            assert "default:" in field.description or field.default_factory() == [], p.name
        elif isinstance(field.default, bool):
            on, off = (p.opts + p.secondary_opts + [None])[:2]
            assert p.show_default == (on if field.default else off or False), p.name
        elif field.default in (None, ""):
            assert p.show_default is False, p.name
        else:
            assert type(field.default)(p.show_default) == field.default, p.name


def test_help_shows_the_settings_defaults():
    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "Port to listen on. [default: (8080)]" in r.output
    assert "[default: (127.0.0.1)]" in r.output and "[default: (--metrics-public)]" in r.output


@pytest.fixture
def served(monkeypatch):
    """Runs `llmhost serve` up to starting the server; the settings it would use, its banner."""
    got: list[tuple[Settings, str]] = []

    def fake_serve(settings, engine, announce):
        announce()
        got.append((settings, engine))

    monkeypatch.setattr(serve_cli, "serve_settings", fake_serve)

    def run(*args: str) -> tuple[Settings, str]:
        r = CliRunner().invoke(app, ["serve", "--engine", "fake", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        settings, _ = got.pop()
        return settings, r.output

    return run


def test_flags_win_over_the_environment_and_absent_ones_do_not(served, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMHOST_PORT", "9002")
    monkeypatch.setenv("LLMHOST_BATCH_SIZE", "64")
    settings, banner = served("--port", "9001", "--ctx", "128", "--key-file", str(tmp_path))
    assert (settings.port, settings.batch_size, settings.ctx_size) == (9001, 64, 128)
    assert settings.model_key_file == tmp_path
    assert settings.max_queue == Settings.model_fields["max_queue"].default
    assert "OpenAI-compatible API at http://127.0.0.1:9001/v1 (model: fake-model)" in banner
    settings, _ = served("--metrics-auth", "--allow-pickle", "--no-auth")
    assert settings.metrics_auth and settings.allow_pickle and not settings.auth
    settings, _ = served()
    assert (settings.port, settings.metrics_auth, settings.allow_pickle) == (9002, False, False)


def test_no_model_fails_first_with_just_the_error():
    r = CliRunner().invoke(app, ["serve"])
    assert isinstance(r.exception, ConfigError) and "no model given" in r.exception.message
    assert r.output == ""  # no banner, no warning about API keys
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "serve"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    assert p.stderr.startswith("error: no model given") and len(p.stderr.splitlines()) == 1


def test_a_busy_port_fails_before_the_banner(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--engine", "fake", "--port", str(port)])
    assert isinstance(r.exception, ConfigError) and "cannot listen" in r.exception.message
    assert "OpenAI-compatible API" not in r.output


def test_plan_settings(tmp_path):
    plan = tmp_path / "plan.json"
    rows = [{"gpu": "A100 80GB", "gpus_needed": 2}, {"gpu": "L4", "gpus_needed": None}]
    plan.write_text(json.dumps({"ctx": 8192, "gpus": rows}))
    settings = Settings()
    assert ops.plan_settings(plan, "a100", settings) == {"tensor_parallel": 2, "ctx_size": 8192}
    with pytest.raises(ConfigError, match="does not fit on L4"):
        ops.plan_settings(plan, "l4", settings)
    with pytest.raises(ConfigError, match="matches 0 rows"):
        ops.plan_settings(plan, "h100", settings)
    with pytest.raises(ConfigError, match="needs --plan-gpu"):
        ops.plan_settings(plan, None, settings)
    plan.write_text("{}")
    with pytest.raises(ConfigError, match="not the JSON"):
        ops.plan_settings(plan, "a100", settings)


def test_a_stored_model_is_looked_up_and_a_missing_one_refused(tmp_path):
    settings = Settings(model=str(tmp_path))
    assert ops.with_stored_model(settings) is settings  # a path that exists
    with pytest.raises(ConfigError, match="model not found: nope:1"):
        ops.with_stored_model(Settings(model="nope:1"))
    vllm = Settings(model="org/repo", engine="vllm")  # a Hugging Face id vLLM fetches
    assert ops.with_stored_model(vllm) is vllm
