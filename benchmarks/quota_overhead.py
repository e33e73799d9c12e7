"""What quota checks cost a request. Prints one JSON line:

- in process: one request's quota work (admit before it runs, charge after) with quotas on
  its key, user and model (all three kinds each), in memory and, when `redis-server` is
  installed, through a Redis on loopback; p50/p99 in microseconds; and the rate limits'
  work through that Redis, for comparison;
- through a real `llmhost serve` (fake engine, auth on, the way benchmarks/gateway_overhead.py
  measures the gateway): latency at a fixed offered rate for a key with quotas on it and its
  user against a key with none, on the same server, alternating in rounds; the added p50 is
  the difference; again with quotas and rate limits shared through that Redis (`_redis`).

    .venv/bin/python benchmarks/quota_overhead.py [--rate 400] [--seconds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway_overhead import Server, cli, open_loop, pct

from llmhost.security.auth import Principal
from llmhost.security.quota import Admission, Quota, QuotaExceeded, Quotas
from llmhost.security.ratelimit import Decision, RateLimiter

BIG = 10**15  # never reached: the cost of the check is what is measured
FULL = Quota(tokens_per_day=BIG, tokens_per_month=BIG, requests_per_day=BIG)
T = TypeVar("T")


async def timed(
    n: int, check: Callable[[], Awaitable[T]], settle: Callable[[T], Awaitable]
) -> dict:
    """p50/p99 microseconds of `check()`, made before a request runs (on its path), and of
    `settle(what check returned)`, made after it ends (once its response is out)."""
    before, after = [], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        checked = await check()
        t1 = time.perf_counter_ns()
        await settle(checked)
        after.append((time.perf_counter_ns() - t1) / 1000)
        before.append((t1 - t0) / 1000)
    return {
        "admit_p50_us": round(pct(before, 50), 1),
        "admit_p99_us": round(pct(before, 99), 1),
        "charge_p50_us": round(pct(after, 50), 1),
        "charge_p99_us": round(pct(after, 99), 1),
    }


async def in_process(quotas: Quotas, n: int) -> dict:
    """One request's quota work with quotas on its key, user and model."""
    targets = [("key", "k1", FULL), ("user", "alice", FULL), ("model", "m1", FULL)]

    async def charge(admitted: Admission | QuotaExceeded) -> None:
        if not isinstance(admitted, Admission):
            raise RuntimeError(admitted.message)
        await quotas.charge(admitted, 7)

    return await timed(n, lambda: quotas.admit(targets), charge)


async def rate_limits_in_process(limiter: RateLimiter, n: int) -> dict:
    """One request's rate-limit work (the instance limit and the user's requests and tokens
    per minute): what sharing them through Redis costs, beside the quotas' own."""
    user = Principal("alice", rpm=BIG // 10**6, tpm=BIG // 10**6)

    async def charge(decision: Decision) -> None:
        if not decision.allowed:
            raise RuntimeError(decision.reason)
        await limiter.charge_tokens(user, 7)

    return await timed(n, lambda: limiter.admit(user), charge)


def redis_server(root: Path) -> tuple[subprocess.Popen | None, str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"redis://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.terminate()
    return None, None


def through_server(
    home: Path, env: dict[str, str], capped: str, free: str, args: argparse.Namespace, tag: str
) -> dict:
    """Latency through a real server for the key with quotas and the one without, in
    alternating rounds at the same offered rate."""
    server = Server(home, env=env)
    h_capped = {"Authorization": f"Bearer {capped}"}
    h_free = {"Authorization": f"Bearer {free}"}
    asyncio.run(open_loop(server.url, h_free, 200, 1))  # warm up
    lat_q: list[float] = []
    lat_f: list[float] = []
    for _ in range(args.rounds):
        for lat, h in ((lat_f, h_free), (lat_q, h_capped)):
            r = asyncio.run(open_loop(server.url, h, args.rate, args.seconds))
            if set(r["codes"]) != {200}:
                raise RuntimeError(f"unexpected statuses {r['codes']}")
            lat += r["lat"]
    server.stop()
    return {
        f"server_latency{tag}_ms": {
            "quotas_p50": round(pct(lat_q, 50), 3),
            "quotas_p99": round(pct(lat_q, 99), 3),
            "none_p50": round(pct(lat_f, 50), 3),
            "none_p99": round(pct(lat_f, 99), 3),
        },
        f"added{tag}_ms_p50": round(pct(lat_q, 50) - pct(lat_f, 50), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=400)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="small and fast, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.rounds = 200, 1, 1
    n = 2000 if args.smoke else 20000
    out: dict = {"offered_rate": args.rate, "cores": os.cpu_count()}
    root = Path(tempfile.mkdtemp(prefix="llmhost-quota-"))
    redis, url = redis_server(root)
    try:
        out["in_process_memory"] = asyncio.run(in_process(Quotas(), n))
        if url is not None:
            out["in_process_redis"] = asyncio.run(in_process(Quotas(url), n // 4))
            limiter = RateLimiter(instance_rps=BIG // 10**6, redis_url=url)
            out["rate_limits_in_process_redis"] = asyncio.run(
                rate_limits_in_process(limiter, n // 4)
            )
        home = root / "server"
        home.mkdir()
        (home / "config.toml").write_text(
            f"[quota_users.capped]\ntokens_per_day = {BIG}\ntokens_per_month = {BIG}\n"
            f"requests_per_day = {BIG}\n"
        )
        capped = cli(
            home,
            "keys",
            "create",
            "--user",
            "capped",
            *("--tokens-per-day", str(BIG), "--tokens-per-month", str(BIG)),
            *("--requests-per-day", str(BIG)),
        )
        free = cli(home, "keys", "create", "--user", "free")
        env = {"LLMHOST_RATE_LIMIT_RPS": "0", "LLMHOST_AUDIT": "false"}
        out.update(through_server(home, env, capped, free, args, ""))
        if url is not None:  # quotas (and rate limits) shared through Redis
            out.update(
                through_server(
                    home, {**env, "LLMHOST_REDIS_URL": url}, capped, free, args, "_redis"
                )
            )
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
