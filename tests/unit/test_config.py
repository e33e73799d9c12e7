from pathlib import Path

import pytest

from llmhost.config import DEFAULT_PORT, load_settings, parse_origin
from llmhost.errors import ConfigError


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("LLMHOST_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path))
    return tmp_path


def test_defaults(tmp_path):
    s = load_settings()
    assert s.port == DEFAULT_PORT == 8080
    assert s.host == "127.0.0.1"
    assert s.engine == "llamacpp"
    assert s.home == tmp_path
    assert s.models_dir == tmp_path / "models"
    assert s.threads >= 1 and s.parallel >= 1


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('port = 9001\nthreads = 3\nlog_format = "json"\n')
    assert load_settings().port == 9001
    assert load_settings().log_format == "json"
    monkeypatch.setenv("LLMHOST_PORT", "9002")
    s = load_settings()
    assert s.port == 9002 and s.threads == 3
    assert load_settings(port=9003).port == 9003
    # a flag left unset (None) does not hide the lower sources
    assert load_settings(port=None).port == 9002


def test_explicit_config_path(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.toml"
    other.write_text("parallel = 7\n")
    monkeypatch.setenv("LLMHOST_CONFIG", str(other))
    assert load_settings().parallel == 7


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"threads": 0}, "threads"),
        ({"log_format": "xml"}, "log_format"),
        ({"parallel": -1}, "parallel"),
    ],
)
def test_invalid_values_raise_one_config_error(kwargs, fragment):
    with pytest.raises(ConfigError) as exc:
        load_settings(**kwargs)
    assert fragment in exc.value.message


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("LLMHOST_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="port"):
        load_settings()


def test_malformed_config_file(tmp_path):
    (tmp_path / "config.toml").write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="config"):
        load_settings()


def test_home_expands_user(monkeypatch):
    s = load_settings(home="~/somewhere")
    assert s.home == Path.home() / "somewhere"


def test_cors_origins_from_env_file_and_flags(tmp_path, monkeypatch):
    s = load_settings()
    assert s.cors_origins == [] and "cors_origins" not in s.model_fields_set
    (tmp_path / "config.toml").write_text(
        'cors_origins = ["https://a.example", "http://localhost:*"]\n'
    )
    s = load_settings()
    assert s.cors_origins == ["https://a.example", "http://localhost:*"]
    assert "cors_origins" in s.model_fields_set  # so --demo keeps the user's choice
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", "https://b.example, HTTP://127.0.0.1:*")
    assert load_settings().cors_origins == ["https://b.example", "http://127.0.0.1:*"]
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", '["https://c.example:8443"]')
    assert load_settings().cors_origins == ["https://c.example:8443"]
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", "")
    assert load_settings().cors_origins == []
    s = load_settings(cors_origins=["https://d.example:443", "*", "https://d.example"])
    assert s.cors_origins == ["https://d.example", "*"]  # default port dropped, duplicates too


def test_bad_cors_origin_names_the_entry(monkeypatch):
    monkeypatch.setenv("LLMHOST_CORS_ORIGINS", "https://ok.example,https://bad.example/app")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "cors_origins" in exc.value.message and "'https://bad.example/app'" in exc.value.message


@pytest.mark.parametrize(
    "origin, parsed",
    [
        ("https://a.example", ("https", "a.example", None)),
        ("http://a.example:80", ("http", "a.example", None)),
        ("http://a.example:8080", ("http", "a.example", 8080)),
        ("http://[::1]:5173", ("http", "[::1]", 5173)),
        ("chrome-extension://abcdef", ("chrome-extension", "abcdef", None)),
    ],
)
def test_parse_origin(origin, parsed):
    assert parse_origin(origin) == parsed


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "",
        "https://",
        "https://a.example/",
        "https://a b",
        "http://a.example:*",
        "a:b",
        "http://a.example:65536",
        "http://[::1",
        "http://é.example",
    ],
)
def test_parse_origin_refuses(origin):
    with pytest.raises(ValueError):
        parse_origin(origin)
