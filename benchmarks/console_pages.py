"""The console's pages on a large server home: 10,000 API keys and 1,000,000 audit records
(90 days, 50 users using 4 keys each, the rest idle, a few models, mixed statuses, a rare
model and status for filters that match little) with matching daily usage sums, against a
real `llmhost serve` of the demo model with authentication on, logged in as an admin.

The home is built once and kept in $LLMHOST_BENCH_CACHE (default ~/.cache/llmhost-bench):
the audit records go through the audit store's own append path in large batches, so the
hash chain stays valid (`llmhost audit verify` passes on it); the keys are written in one
transaction into the key store's own table.

    PYTHONPATH=src .venv/bin/python benchmarks/console_pages.py            # the full run
    PYTHONPATH=src .venv/bin/python benchmarks/console_pages.py --active-keys 10000  # all used
    PYTHONPATH=src .venv/bin/python benchmarks/console_pages.py --smoke    # 20,000 records

Prints one JSON line last: p50/p95 ms per page and whether each is under 200 ms p95.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import CACHE, free_port, start, stop

from llmhost.audit.store import AuditRecord, SqliteAuditStore
from llmhost.security.auth import KeyStore, _digest
from llmhost.security.usage import UsageStore, utc_day
from llmhost.store.demo import ensure_demo_model

TARGET_MS = 200.0
DAY = 86400.0
DAYS = 90
USERS = [f"user{i:02d}" for i in range(50)]
MODELS = ["demo", "llama-3-8b", "qwen2-7b", "mistral-7b"]
RARE_MODEL = "phi-2"  # one record in 2,000: a filter that matches little
# status, weight (per 2,000): mostly answered, some refused, a few failed, rarely 503
STATUSES = [(200, 1799), (429, 100), (400, 60), (500, 20), (401, 20), (503, 1)]
KEYS_IN_USE = 4  # per user: most of the 10,000 keys are idle, as on a real server
ACTIVE = KEYS_IN_USE * len(USERS)  # keys that make requests, by default
BATCH = 50_000


def build_home(home: Path, records: int, keys: int, active: int) -> str:
    """Writes the home's keys, audit log and usage sums; returns the admin key."""
    home.mkdir(parents=True, exist_ok=True)
    rng = random.Random(18)
    store = KeyStore(home / "keys.db")
    admin, _ = store.create("bench-admin", "admin")
    store.close()
    t0 = time.time()
    rows = []
    key_ids = []
    for i in range(keys - 1):
        key_id = secrets.token_hex(6)
        if i < active:
            key_ids.append((key_id, USERS[i % len(USERS)]))
        rows.append(
            (
                key_id,
                _digest(secrets.token_urlsafe(32)),
                USERS[i % len(USERS)],
                "user",
                t0 - rng.uniform(0, DAYS * DAY),
                None,
                None,
                None,
                None,
            )
        )
    db = KeyStore(home / "keys.db")._db
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO api_keys (key_id, secret_sha256, user_id, role, created, expires, "
        "revoked, rpm, tpm) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.execute("COMMIT")
    db.close()

    audit = SqliteAuditStore(home / "audit.db")
    usage: dict[tuple[str, str, str, str], list[int]] = {}
    start = t0 - DAYS * DAY
    step = DAYS * DAY / records
    statuses = [s for s, w in STATUSES for _ in range(w)]
    batch: list[AuditRecord] = []
    for n in range(records):
        ts = start + n * step + rng.uniform(0, step)
        key_id, user = key_ids[rng.randrange(len(key_ids))] if key_ids else ("", USERS[0])
        model = MODELS[min(int(rng.expovariate(1.2)), len(MODELS) - 1)]
        if rng.randrange(2000) == 0:
            model = RARE_MODEL
        status = rng.choice(statuses)
        pt, ct = rng.randint(8, 900), rng.randint(0, 400) if status == 200 else 0
        batch.append(
            AuditRecord(
                ts=ts,
                request_id=f"req-{n:08d}",
                client_ip=f"10.0.{n % 200}.{n % 251}",
                user_id=user,
                route="/v1/chat/completions",
                status=status,
                model=model,
                prompt=f"[redacted] question {n % 977} about ports and queues",
                response_length=ct * 4,
                prompt_tokens=pt,
                completion_tokens=ct,
                latency_ms=rng.uniform(30, 4000),
            )
        )
        if status == 200:
            sums = usage.setdefault((utc_day(ts), key_id, user, model), [0, 0, 0])
            sums[0] += 1
            sums[1] += pt
            sums[2] += ct
        if len(batch) == BATCH:
            audit.append(batch)
            batch = []
    if batch:
        audit.append(batch)
    audit.close()
    usage_store = UsageStore(home / "usage.db")
    usage_store.add({k: (v[0], v[1], v[2]) for k, v in usage.items()})
    usage_store.close()
    (home / "bench-admin.key").write_text(admin)
    return admin


def home_for(records: int, keys: int, active: int) -> tuple[Path, str]:
    suffix = "" if active == min(ACTIVE, keys - 1) else f"-{active}-active"
    home = CACHE / f"console-v3-{records}-{keys}{suffix}"
    done = home / "bench-admin.key"
    if not done.exists():
        if home.exists():  # a build that did not finish
            for f in home.glob("*"):
                if f.is_file():
                    f.unlink()
        print(f"[bench] building {home} ({records} records, {keys} keys)", file=sys.stderr)
        t = time.perf_counter()
        build_home(home, records, keys, active)
        print(f"[bench] built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return home, done.read_text().strip()


def serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LLMHOST_HOME": str(home),
        "LLMHOST_AUDIT_RETENTION_DAYS": "0",  # the oldest records stay, whatever day it is
        "LLMHOST_RATE_LIMIT_RPS": "0",
    }
    model = str(ensure_demo_model(home / "models"))  # --demo would turn authentication off
    cmd = [sys.executable, "-m", "llmhost", "serve", model, "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    return start(cmd, url + "/ready", CACHE / "console-logs" / "llmhost.log", env)


def login(client: httpx.Client, admin: str) -> None:
    page = client.get("/console/login")
    page.raise_for_status()
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    if found is None:
        raise SystemExit("no CSRF token on the login page")
    done = client.post("/console/login", data={"csrf": found.group(1), "key": admin})
    if done.status_code != 303:
        raise SystemExit(f"login failed: {done.status_code}")


def pages(records: int) -> dict[str, str]:
    day = time.strftime("%Y-%m-%dT00:00", time.gmtime(time.time() - 45 * DAY))
    next_day = time.strftime("%Y-%m-%dT00:00", time.gmtime(time.time() - 44 * DAY))
    month = time.strftime("%Y-%m-%dT00:00", time.gmtime(time.time() - 60 * DAY))
    since = utc_day(time.time() - (DAYS - 1) * DAY)
    until = utc_day(time.time())
    usage = f"/console/usage?since={since}&until={until}&group_by="
    deep = 150 if records >= 1_000_000 else 20
    return {
        "overview": "/console",
        "usage_user": usage + "user",
        "usage_key": usage + "key",
        "usage_model": usage + "model",
        "usage_day": usage + "day",
        "keys": "/console/keys",
        "audit": "/console/audit",
        "audit_user": "/console/audit?user=user07",
        "audit_model": "/console/audit?model=mistral-7b",
        "audit_model_rare": f"/console/audit?model={RARE_MODEL}",
        "audit_status": "/console/audit?status=500",
        "audit_status_rare": "/console/audit?status=503",
        "audit_user_model": f"/console/audit?user=user07&model={RARE_MODEL}",
        "audit_day": f"/console/audit?since={day}&until={next_day}",
        "audit_30_days": f"/console/audit?since={month}&until={day}",
        "audit_30_days_model": f"/console/audit?since={month}&until={day}&model=demo",
        f"audit_page_{deep}": f"/console/audit?page={deep}",
        "playground": "/console/playground",
    }


def measure(client: httpx.Client, path: str, n: int) -> dict[str, float | bool]:
    client.get(path).raise_for_status()  # warm up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
    return {
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(p95, 1),
        "kb": round(len(r.content) / 1024, 1),
        "under_200ms_p95": p95 < TARGET_MS,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="20,000 records and 200 keys")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--keys", type=int, default=None)
    ap.add_argument("-n", type=int, default=None, help="requests per page")
    ap.add_argument(
        "--active-keys",
        type=int,
        default=ACTIVE,
        help=f"keys the requests come from ({ACTIVE}; all of them: as many as --keys)",
    )
    args = ap.parse_args()
    records = args.records or (20_000 if args.smoke else 1_000_000)
    keys = args.keys or (200 if args.smoke else 10_000)
    n = args.n or (10 if args.smoke else 40)
    active = min(args.active_keys, keys - 1)
    home, admin = home_for(records, keys, active)
    port = free_port()
    proc = serve(home, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            login(client, admin)
            figures = {name: measure(client, path, n) for name, path in pages(records).items()}
    finally:
        stop([proc])
    out = {
        "records": records,
        "keys": keys,
        "active_keys": active,
        "requests_per_page": n,
        "pages": figures,
        "all_under_200ms_p95": all(f["under_200ms_p95"] for f in figures.values()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
