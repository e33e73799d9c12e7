"""The Redis connection that the rate limits and the quotas share across instances."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

from limits.aio.storage import Storage
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from llmhost.errors import ConfigError

REDIS_PY_MIN = (5, 2)  # the asyncio client `limits` takes


def redis_storage(redis_url: str, namespace: str) -> Storage:
    """The `limits` library's asyncio Redis storage for `redis_url` (redis://, rediss://,
    redis+sentinel://, redis+cluster://), on the redis-py client: with hiredis, about a third
    less time per command than coredis, the library's default (benchmarks/quota_overhead.py).
    No error repeats the URL's password."""
    shown = _without_password(redis_url)
    if not _redis_py_installed():
        raise ConfigError(
            f"sharing limits through Redis ({shown}) needs redis-py "
            f">= {'.'.join(map(str, REDIS_PY_MIN))}: pip install 'llmhost[redis]'"
        )
    uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
    try:
        store = storage_from_string(uri, key_prefix=namespace, implementation="redispy")
    except (ConfigurationError, ValueError) as exc:
        raise ConfigError(f"{shown}: {_redacted(str(exc), redis_url)}") from None
    if not isinstance(store, Storage) or not hasattr(store, "bridge"):
        raise ConfigError(f"{shown} is not a Redis URL")
    return store


def _redis_py_installed() -> bool:
    try:
        have = version("redis")
    except PackageNotFoundError:
        return False
    try:
        import redis.asyncio  # noqa: F401 (importable, not only installed)
    except ImportError:
        return False
    parts = tuple(int(p) for p in have.split(".")[:2] if p.isdigit())
    return parts >= REDIS_PY_MIN


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _redacted(text: str, url: str) -> str:
    secret = _password(url)
    return text.replace(secret, "***") if secret else text


def _without_password(url: str) -> str:
    return _redacted(url, url)
