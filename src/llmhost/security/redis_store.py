"""The Redis connection that the rate limits and the quotas share across instances."""

from __future__ import annotations

from limits.aio.storage import Storage
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from llmhost.errors import ConfigError


def redis_storage(redis_url: str, namespace: str) -> Storage:
    """The `limits` library's asyncio Redis storage for `redis_url` (redis://, rediss://,
    redis+sentinel://, redis+cluster://), on the redis-py client: with hiredis, about a third
    less time per command than coredis, the library's default (benchmarks/quota_overhead.py)."""
    uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
    try:
        store = storage_from_string(uri, key_prefix=namespace, implementation="redispy")
    except ConfigurationError as exc:
        raise ConfigError(
            f"Redis at {uri.removeprefix('async+').split('@')[-1]}: {exc}; "
            "sharing limits through Redis needs: pip install 'llmhost[redis]'"
        ) from exc
    if not isinstance(store, Storage) or not hasattr(store, "bridge"):
        raise ConfigError(f"{redis_url} is not a Redis URL")
    return store
