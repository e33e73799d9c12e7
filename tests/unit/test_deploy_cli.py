"""deploy and systemd commands without servers: step parsing, state errors, unit files."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llmhost.cli.deploy import _floats
from llmhost.cli.main import app
from llmhost.errors import ConfigError, DeployError
from llmhost.ops.deploy import Deployer, DeployState


def test_steps():
    assert _floats("0.1,0.5,1") == [0.1, 0.5, 1.0]
    assert _floats("1") == [1.0]
    for bad in ("", "0", "0.5,0.2", "1.5", "x", "-0.1,1"):
        with pytest.raises(ConfigError):
            _floats(bad)


def test_no_state_and_unreachable_router(tmp_path):
    d = Deployer(tmp_path / "deploy.json", admin_token="t")
    with pytest.raises(ConfigError, match="deploy init"):
        DeployState.load(tmp_path / "deploy.json")
    with pytest.raises(ConfigError):
        d.promote()
    with pytest.raises(DeployError, match="does not answer"):
        d.init("http://127.0.0.1:9", 1, 2)
    with pytest.raises(ConfigError):
        d.init("http://127.0.0.1:9", 1, 2, live="red")


def test_systemd_units(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "systemd",
            "--out",
            str(tmp_path),
            "--model",
            "llama3:8b",
            "-u",
            "a=http://10.0.0.5:8080",
            "-u",
            "b=http://10.0.0.6:8080",
        ],
    )
    assert r.exit_code == 0, r.output
    server = (tmp_path / "llmhost.service").read_text()
    assert "serve llama3:8b --port 8080" in server and "Restart=always" in server
    router = (tmp_path / "llmhost-router.service").read_text()
    assert "router -u a=http://10.0.0.5:8080 -u b=http://10.0.0.6:8080" in router
