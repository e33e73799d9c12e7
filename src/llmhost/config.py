"""One settings schema for llmhost. Sources, strongest first: CLI flags (passed as keyword
arguments), environment variables `LLMHOST_*`, the TOML file `$LLMHOST_HOME/config.toml`
(or `$LLMHOST_CONFIG`), then the defaults below."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from llmhost.durations import parse_duration
from llmhost.errors import ConfigError

DEFAULT_PORT = 8080  # the port the deployment guide's firewall rule opens


def default_home() -> Path:
    return Path(os.environ.get("LLMHOST_HOME") or Path.home() / ".llmhost").expanduser()


def config_file_path() -> Path:
    explicit = os.environ.get("LLMHOST_CONFIG")
    return Path(explicit).expanduser() if explicit else default_home() / "config.toml"


_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789+-.")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_IPV6_CHARS = frozenset("0123456789abcdef:.")
_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = "*"


def parse_origin(text: str, *, port_wildcard: bool = False) -> tuple[str, str, int | str | None]:
    """(scheme, host, port) of a browser origin, `scheme://host[:port]`, lower-cased and with a
    default port (80 for http, 443 for https) as None, the way browsers send the Origin header.
    With `port_wildcard`, `:*` stands for any port (port `ANY_PORT`). Parsed by hand rather
    than with a regex, so no input can make matching slow. ValueError when it is no origin."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme or not scheme[0].isalpha() or not set(scheme) <= _SCHEME_CHARS:
        raise ValueError("no scheme://")
    if not rest or any(c in rest for c in "/?#@\\") or not rest.isprintable() or " " in rest:
        raise ValueError("it has a path, query or user part")
    rest = rest.lower()
    if rest.startswith("["):  # an IPv6 literal
        end = rest.find("]")
        host, tail = rest[: end + 1], rest[end + 1 :]
        if end < 2 or not set(host[1:-1]) <= _IPV6_CHARS:
            raise ValueError(f"bad IPv6 address in {rest!r}")
    else:
        host, colon, tail = rest.partition(":")
        tail = colon + tail
        if not host or not set(host) <= _HOST_CHARS or host.startswith((".", "-")):
            raise ValueError(f"bad host {host!r}")
    port: int | str | None = None
    if tail:
        digits = tail[1:]
        if not tail.startswith(":"):
            raise ValueError(f"unexpected {tail!r} after the host")
        if digits == ANY_PORT and port_wildcard:
            port = ANY_PORT
        elif digits.isascii() and digits.isdigit() and 0 < len(digits) <= 5:
            port = int(digits)
            if not 0 < port <= 65535:
                raise ValueError(f"port {port} out of range")
            if _DEFAULT_PORTS.get(scheme) == port:
                port = None
        else:
            raise ValueError(f"bad port {digits!r}")
    return scheme, host, port


def public_url(text: str, name: str) -> str:
    """`text` as the address browsers use for a console behind a proxy that ends TLS: a
    scheme, host and port (`scheme://host[:port]`); ValueError naming `name` otherwise."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} is an http(s) URL: https://llm.example.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"{name} is a scheme, host and port only (the console is at /console under it): "
            "no path, query, fragment or credentials"
        )
    return f"{parts.scheme}://{parts.netloc}"


def normalize_origin_entry(entry: str) -> str:
    """A `cors_origins` entry in the form requests are matched against: `*`, or an origin as
    browsers send it, or one with `:*` for any port."""
    entry = entry.strip()
    if entry == "*":
        return entry
    try:
        scheme, host, port = parse_origin(entry, port_wildcard=True)
    except ValueError as exc:
        raise ValueError(
            f"{entry!r} is not an origin ({exc}): give scheme://host[:port] with no path, "
            "e.g. https://app.example.com, http://localhost:* (any port) or * (any origin)"
        ) from None
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def default_parallel() -> int:
    # Batched decode amortises each weight read over the sequences in the step, so more
    # sequences than cores pays off on CPU; KV memory grows with it, hence the cap.
    return max(4, min(16, 2 * default_threads()))


def default_threads() -> int:
    # Decode is memory-bound; hyper-threads add contention rather than speed.
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


QUOTA_NOTE = "unset: no quota; 0: refuse every request"


def _quota_field(what: str) -> Any:
    return Field(None, ge=0, le=1 << 53, description=f"{what} ({QUOTA_NOTE}).")


class QuotaEntry(BaseModel):
    """One user's quotas (`[quota_users.<user id>]` in config.toml), in place of the server's
    `quota_*` defaults; a kind left out is no quota of that kind for this user."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_day: int | None = _quota_field("Tokens per UTC day")
    tokens_per_month: int | None = _quota_field("Tokens per UTC calendar month")
    requests_per_day: int | None = _quota_field("Requests per UTC day")


class ModelEntry(BaseModel):
    """One model of a server that serves several (`[models.<id>]` in config.toml): where it
    comes from, its engine and the engine settings that differ from the server's."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, description="A GGUF file, a folder or a name:tag.")
    engine: str | None = Field(None, description="Engine; default: the server's.")
    kind: Literal["chat", "embedding", "rerank"] = Field("chat", description="What it serves.")
    keep_alive: float | str | None = Field(
        None, description="Unload after this long idle (seconds, or 30s, 5m, 2h, 1d)."
    )
    pinned: bool = Field(False, description="Loaded at start and never unloaded.")
    rate_limit_rpm: int = Field(
        0, ge=0, description="Requests per minute to this model, all users together; 0: none."
    )
    quota_tokens_per_day: int | None = _quota_field("Tokens per UTC day, all users together")
    quota_tokens_per_month: int | None = _quota_field(
        "Tokens per UTC calendar month, all users together"
    )
    quota_requests_per_day: int | None = _quota_field("Requests per UTC day, all users together")
    ctx_size: int | None = Field(None, ge=0)
    parallel: int | None = Field(None, ge=1, le=256)
    threads: int | None = Field(None, ge=1, le=1024)
    batch_size: int | None = Field(None, ge=1)
    dtype: str | None = None
    device: str | None = None
    quantization: str | None = None
    upstream_url: str | None = None
    tool_parser: Literal["hermes", "llama3", "mistral", "deepseek", "json"] | None = None


class Settings(BaseSettings):
    """Everything `llmhost serve` needs; every field is also `LLMHOST_<NAME>` and a config key."""

    model_config = SettingsConfigDict(
        env_prefix="LLMHOST_",
        extra="ignore",
        validate_default=True,
    )

    home: Path = Field(default_factory=default_home, description="State folder.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="Port to listen on.")
    model: str | None = Field(None, description="Path of the model file or folder to serve.")
    model_name: str | None = Field(None, description="Model id clients use; default: file stem.")
    engine: str = Field(
        "llamacpp",
        description="Engine name from the engine registry: llamacpp, transformers, vllm, "
        "openai, fake or a plugin's.",
    )
    threads: int = Field(
        default_factory=default_threads,
        ge=1,
        le=1024,
        description="CPU threads; default: the physical cores.",
    )
    ctx_size: int = Field(
        0, ge=0, description="Context tokens per sequence; 0 = model's own, capped at 4096."
    )
    parallel: int = Field(
        default_factory=default_parallel,
        ge=1,
        le=256,
        description="Sequences decoded together; default: 2 x physical cores, 4 to 16.",
    )
    batch_size: int = Field(512, ge=16, le=65536, description="Most tokens per decode step.")
    max_queue: int = Field(64, ge=0, description="Requests that may wait for a free sequence.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' type (transformers engine): auto, float32, bfloat16 or "
        "float16; auto picks per device.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (transformers engine).")
    allow_pickle: bool = Field(
        False, description="Load pickle (.bin) weights, which can run code (transformers)."
    )
    mmap: bool = Field(True, description="Memory-map model weights instead of reading them.")
    model_key_file: Path | None = Field(None, description="Key of an encrypted model (0600).")
    model_key_command: str | None = Field(None, description="Command printing the model key.")
    decrypt_dir: Path = Field(
        Path("/dev/shm"), description="tmpfs folder an encrypted model is decrypted into."
    )
    ssl_certfile: Path | None = Field(None, description="Certificate (PEM) to serve HTTPS.")
    ssl_keyfile: Path | None = Field(None, description="Private key (PEM) of the certificate.")
    auth: bool = Field(True, description="Require an API key or JWT (off: --no-auth, --demo).")
    jwt_algorithm: str = Field("HS256", description="The only JWT algorithm accepted.")
    jwt_secret: str | None = Field(None, description="HS* shared secret (>= 32 characters).")
    jwt_public_key: Path | None = Field(None, description="PEM public key for RS*/ES*/PS*.")
    jwt_jwks: Path | None = Field(None, description="JWKS file of public keys (by kid).")
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = Field(30.0, ge=0, le=600, description="Clock skew allowed, seconds.")
    rate_limit_rps: int = Field(100, ge=0, description="Requests/s per instance; 0 = off.")
    rate_limit_rpm: int = Field(0, ge=0, description="Default requests/min per user; 0 = off.")
    rate_limit_tpm: int = Field(0, ge=0, description="Default tokens/min per user; 0 = off.")
    auth_failures_per_minute: int = Field(
        30, ge=0, description="Failed authentications per client IP per minute; 0 = off."
    )
    quota_tokens_per_day: int | None = _quota_field(
        "Tokens per UTC day for each user without a [quota_users] entry"
    )
    quota_tokens_per_month: int | None = _quota_field(
        "Tokens per UTC calendar month for each user without a [quota_users] entry"
    )
    quota_requests_per_day: int | None = _quota_field(
        "Requests per UTC day for each user without a [quota_users] entry"
    )
    quota_users: dict[str, QuotaEntry] = Field(
        default_factory=dict,
        description="Quotas of named users ([quota_users.<user id>] tables), in place of the "
        "quota_* defaults.",
    )
    usage: bool = Field(
        True, description="Add up requests and tokens per key, user and model per day (usage.db)."
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=0, description="Largest request body (413 above); 0 = no limit."
    )
    redis_url: str | None = Field(None, description="Share rate limits through this Redis.")
    audit: bool = Field(True, description="Write one audit record per generation request.")
    audit_url: str | None = Field(
        None, description="postgresql://... to share one audit log; default SQLite audit.db."
    )
    audit_prompt_mode: Literal["redacted", "full", "hash", "none"] = Field(
        "redacted", description="How the audit log keeps prompts."
    )
    audit_retention_days: float = Field(90.0, ge=0, description="0 keeps audit records forever.")
    audit_redact_ip: bool = Field(False, description="Also redact IP addresses in prompts.")
    audit_prompt_max_chars: int = Field(
        32768, ge=256, le=16 * 1024 * 1024, description="Prompt characters an audit record keeps."
    )
    audit_key_file: Path | None = Field(
        None,
        description="Key signing the audit chain (0600; made on first use); default "
        "$LLMHOST_HOME/audit.key. Instances sharing one PostgreSQL log need the same key.",
    )
    backup_key_file: Path | None = Field(
        None,
        description="Key signing unencrypted backup records (0600; made by the first backup); "
        "default $LLMHOST_HOME/backup.key. Keep a copy apart from the backups.",
    )
    upstream_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible server the openai engine fronts."
    )
    upstream_api_key: str | None = Field(None, description="Key the upstream expects.")
    upstream_timeout: float = Field(600.0, gt=0, description="Seconds one upstream call may take.")
    vllm_command: str = Field("vllm", description="The vllm executable (vllm engine).")
    tensor_parallel: int = Field(1, ge=1, le=64, description="GPUs one model is split over.")
    pipeline_parallel: int = Field(1, ge=1, le=64, description="Pipeline stages (nodes).")
    distributed_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM's executor: mp, or ray for several nodes."
    )
    quantization: str | None = Field(
        None, description="transformers: int8 or int4; vLLM: its --quantization (awq, fp8, ...)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU share for vLLM.")
    vllm_args: str = Field("", description="More `vllm serve` flags.")
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics on this port only (same host)."
    )
    metrics_auth: bool = Field(False, description="/metrics needs an API key or JWT too.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or json.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged: debug, info, warning or error."
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds SIGTERM waits for in-flight streams."
    )
    verify_on_load: Literal["auto", "full", "size"] = Field(
        "auto",
        description="Checks of a stored model at start: auto = sizes, and sha256 of the files "
        "not verified since they changed if they total <= verify_hash_max_mb; full = sha256 "
        "of every file; size = sizes only.",
    )
    verify_hash_max_mb: int = Field(
        1024, ge=0, le=1 << 24, description="auto: most MiB hashed at start (~1 s per GiB)."
    )
    decrypt_allow_disk: bool = Field(
        False,
        description="Let decrypt_dir be on a disk, not tmpfs/ramfs: plaintext weights on disk.",
    )
    prompt_cache: bool = Field(
        True,
        description="Reuse the KV of a cached prompt prefix (multi-turn chat, shared system "
        "prompts); a request may opt out with cache_prompt: false.",
    )
    prompt_cache_mb: int = Field(
        1024,
        ge=0,
        le=1 << 20,
        description="Host memory (MiB) for prompt prefixes kept outside the sequence slots; "
        "0 keeps only what the slots hold.",
    )
    tool_parser: Literal["hermes", "llama3", "mistral", "deepseek", "json"] | None = Field(
        None,
        description="The model's tool-call format: hermes, llama3, mistral, deepseek or json; "
        "by default found from its chat template.",
    )
    # NoDecode: the env var is a comma-separated list, not JSON (the validator splits it).
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS): https://app.example.com, "
        "http://localhost:* (any port) or * (any origin, no credentials); empty = no CORS "
        "headers, so browsers on other origins cannot read any response.",
    )

    models: dict[str, ModelEntry] = Field(
        default_factory=dict,
        description="Several models in one server ([models.<id>] tables in config.toml), "
        "loaded on demand; the first is the default.",
    )
    keep_alive: float | str | None = Field(
        None,
        description="How long a model loaded on demand stays once idle (seconds, or 30s, 5m, "
        "2h, 1d); unset: until its memory is needed.",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="Host memory (MiB) the models may hold together, by `llmhost plan`'s "
        "estimate (weights + KV cache); default: 80% of the host's RAM.",
    )
    gpu_memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="GPU memory (MiB, each GPU) the models placed there may hold together; "
        "default: 90% of each GPU's memory, as `llmhost plan` fits a card.",
    )
    model_load_timeout: float = Field(
        600.0, gt=0, le=86400, description="Seconds a request waits for its model to load."
    )
    console_session_lifetime: float = Field(
        8 * 3600.0,
        gt=0,
        le=30 * 86400,
        description="How long a /console login lasts (seconds, or 30m, 8h, 1d); logout ends it "
        "sooner.",
    )
    console_public_url: str | None = Field(
        None,
        max_length=2048,
        description="The address browsers reach llmhost at, when a proxy in front ends TLS "
        "(https://llm.example.com): the SSO redirect URI is built from it, and the console's "
        "cookies are Secure when it is https. Unset: from each request's own scheme and Host.",
    )
    oidc_issuer: str | None = Field(
        None,
        max_length=2048,
        description="Single sign-on for /console: the OpenID Connect issuer URL (its "
        "/.well-known/openid-configuration is read); unset: API-key login only.",
    )
    oidc_client_id: str | None = Field(None, max_length=512, description="SSO client id.")
    oidc_client_secret: str | None = Field(
        None, max_length=4096, description="SSO client secret; unset: a public client (PKCE)."
    )
    oidc_scopes: str = Field(
        "openid email profile", max_length=1024, description="Scopes the console asks for."
    )
    oidc_role_claim: str = Field(
        "groups",
        min_length=1,
        max_length=256,
        description="The id token claim holding the user's roles or groups; a dotted path "
        "reaches into objects (realm_access.roles).",
    )
    # NoDecode: the env var is a comma-separated list, as cors_origins.
    oidc_admin_values: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Values of the role claim that make a console admin; everyone else is "
        "refused (the console is for admins).",
    )
    oidc_user_claim: str = Field(
        "email",
        min_length=1,
        max_length=256,
        description="The claim naming the user in the audit log (sub when it is missing).",
    )

    @field_validator("oidc_admin_values", mode="before")
    @classmethod
    def _split_admin_values(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.strip().startswith("["):  # a JSON list, as pydantic-settings takes lists
                try:
                    return json.loads(v)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list of values: {exc}") from None
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("oidc_issuer")
    @classmethod
    def _check_issuer(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("the OIDC issuer is an http(s) URL")
        return v

    @field_validator("console_public_url")
    @classmethod
    def _check_public_url(cls, v: str | None) -> str | None:
        return None if v is None else public_url(v, "console_public_url")

    @model_validator(mode="after")
    def _check_oidc(self) -> Settings:
        if self.oidc_issuer is not None and not (self.oidc_client_id and self.oidc_admin_values):
            raise ValueError("oidc_issuer needs oidc_client_id and oidc_admin_values too")
        return self

    @field_validator("console_session_lifetime", mode="before")
    @classmethod
    def _parse_lifetime(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str) else v

    @field_validator("home", mode="before")
    @classmethod
    def _expand_home(cls, v: Any) -> Any:
        return Path(v).expanduser() if isinstance(v, str | Path) else v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):  # a JSON list, as pydantic-settings takes lists elsewhere
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list of origins: {exc}") from None
            v = [text]
        if isinstance(v, list | tuple):
            return [p.strip() for item in v for p in str(item).split(",") if p.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(normalize_origin_entry(e) for e in v))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file_path())
        return (init_settings, env_settings, toml)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def audit_db(self) -> Path:
        return self.home / "audit.db"

    @property
    def audit_key_path(self) -> Path:
        return (self.audit_key_file or self.home / "audit.key").expanduser()

    @property
    def audit_head_path(self) -> Path:
        """The signed head checkpoint of the audit chain."""
        return self.home / "audit.head"

    @property
    def backup_key_path(self) -> Path:
        return (self.backup_key_file or self.home / "backup.key").expanduser()

    @property
    def usage_db(self) -> Path:
        return self.home / "usage.db"

    @property
    def keys_db(self) -> Path:
        return self.home / "keys.db"

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks)


def load_settings(**overrides: Any) -> Settings:
    """Build settings, dropping overrides left as None (flags the user did not give), and turn
    validation failures and unreadable config files into one ConfigError."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    except (OSError, ValueError) as exc:  # an unreadable or malformed config.toml
        raise ConfigError(f"cannot read config {config_file_path()}: {exc}") from exc
