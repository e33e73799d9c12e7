"""What auth + rate limiting + audit cost, with the fake engine behind real `llmhost serve`
processes on loopback. Prints one JSON line:

- latency added at a fixed offered rate (open loop, default 1,000 req/s): p50/p99 with all
  three on minus the same with all three off, alternating the two servers;
- sustained throughput with all three on (wrk, closed loop);
- rate-limit precision: 300 req/s offered for 10 s against a 100 req/s instance limit,
  admitted per second, 429s and 5xx;
- audit: exactly N requests, a graceful stop, then the record count and `audit verify`.

    .venv/bin/python benchmarks/gateway_overhead.py [--rate 1000] [--seconds 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BODY = {"prompt": "hello", "max_tokens": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {**os.environ, "LLMHOST_HOME": str(home), **(env or {})}
        cmd = [sys.executable, "-m", "llmhost", "serve", "--engine", "fake"]
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def cli(home: Path, *args: str) -> str:
    env = {**os.environ, "LLMHOST_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "llmhost", *args], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout.strip()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


class _Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to send a
    fixed request and read its response: an asyncio client this thin keeps up with 1,000+
    req/s on one core, where a general-purpose client would be the bottleneck measured."""

    def __init__(self, host: str, port: int, request: bytes):
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader = self.reader
        assert reader is not None
        self.writer.write(self.request)
        status = int((await reader.readline()).split()[1])
        length, chunked, close = 0, False, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            while (size := int((await reader.readline()).strip(), 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
        else:
            await reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _request(url: str, headers: dict) -> tuple[str, int, bytes]:
    u = httpx.URL(url)
    body = json.dumps(BODY).encode()
    head = [
        "POST /v1/completions HTTP/1.1",
        f"Host: {u.host}:{u.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return u.host, u.port or 80, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def load(
    url: str, headers: dict, total: int, rate: float | None = None, connections: int = 64
) -> dict:
    """`total` requests over `connections` keep-alive connections: at fixed arrival times
    `rate` per second (open loop; latency counts from the scheduled arrival, so time spent
    waiting for a connection is not hidden), or back to back (closed loop, rate None)."""
    host, port, request = _request(url, headers)
    lat: list[float] = []
    codes: dict[int, int] = {}
    admitted: list[float] = []
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    start = time.perf_counter()

    async def worker() -> None:
        conn = _Conn(host, port, request)
        while (due := await queue.get()) is not None:
            try:
                code = await conn.send()
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                conn.close()
                code = -1
            t1 = time.perf_counter()
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append((t1 - due) * 1000)
                admitted.append(t1 - start)
        conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    for i in range(total):
        if rate is None:
            queue.put_nowait(time.perf_counter())
            if queue.qsize() > connections:
                await asyncio.sleep(0)
            continue
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(due)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return {"lat": lat, "codes": codes, "admitted": admitted}


async def open_loop(url: str, headers: dict, rate: float, seconds: float) -> dict:
    return await load(url, headers, int(rate * seconds), rate)


async def closed_loop(url: str, headers: dict, total: int, concurrency: int = 32) -> dict:
    return (await load(url, headers, total, None, concurrency))["codes"]


def wrk(url: str, key: str | None, seconds: int) -> float | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
        f.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"{auth}wrk.body = '{json.dumps(BODY)}'\n"
        )
    out = subprocess.run(
        [exe, "-t2", "-c64", f"-d{seconds}s", "-s", f.name, url + "/v1/completions"],
        capture_output=True,
        text=True,
    ).stdout
    os.unlink(f.name)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk saw {bad.group(1)} non-2xx responses:\n{out}")
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--audit-requests", type=int, default=10000)
    ap.add_argument("--smoke", action="store_true", help="small and fast, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.rounds, args.audit_requests = 200, 1, 1, 300
    root = Path(tempfile.mkdtemp(prefix="llmhost-gw-"))
    out: dict = {"offered_rate": args.rate, "cores": os.cpu_count()}
    try:
        on_home, off_home = root / "on", root / "off"
        key = cli(on_home, "keys", "create", "--user", "bench", "--rpm", "100000000")
        # All three on: API key auth, instance + per-user limits (high enough never to refuse
        # here: the cost of the check is what is measured), redacted audit records.
        on = Server(on_home, env={"LLMHOST_RATE_LIMIT_RPS": "1000000"})
        off = Server(
            off_home, "--no-auth", env={"LLMHOST_RATE_LIMIT_RPS": "0", "LLMHOST_AUDIT": "false"}
        )
        hon = {"Authorization": f"Bearer {key}"}
        asyncio.run(open_loop(on.url, hon, 200, 1))  # warm both
        asyncio.run(open_loop(off.url, {}, 200, 1))
        lat_on: list[float] = []
        lat_off: list[float] = []
        for _ in range(args.rounds):
            r_off = asyncio.run(open_loop(off.url, {}, args.rate, args.seconds))
            r_on = asyncio.run(open_loop(on.url, hon, args.rate, args.seconds))
            lat_off += r_off["lat"]
            lat_on += r_on["lat"]
            for r in (r_on, r_off):
                if set(r["codes"]) != {200}:
                    raise RuntimeError(f"unexpected statuses {r['codes']}")
        out["latency_ms"] = {
            "on_p50": round(pct(lat_on, 50), 3),
            "on_p99": round(pct(lat_on, 99), 3),
            "off_p50": round(pct(lat_off, 50), 3),
            "off_p99": round(pct(lat_off, 99), 3),
        }
        out["added_ms_p50"] = round(pct(lat_on, 50) - pct(lat_off, 50), 3)
        out["added_ms_p99"] = round(pct(lat_on, 99) - pct(lat_off, 99), 3)
        secs = 3 if args.smoke else 10
        out["wrk_req_s_all_on"] = wrk(on.url, key, secs)
        out["wrk_req_s_all_off"] = wrk(off.url, None, secs)
        off.stop()
        on.stop()
        # rate-limit precision
        lim_home = root / "limit"
        lim = Server(
            lim_home, "--no-auth", env={"LLMHOST_RATE_LIMIT_RPS": "100", "LLMHOST_AUDIT": "false"}
        )
        seconds = 3 if args.smoke else 10
        r = asyncio.run(open_loop(lim.url, {}, 300, seconds))
        lim.stop()
        per_second = [sum(1 for a in r["admitted"] if s <= a < s + 1) for s in range(seconds)]
        out["rate_limit"] = {
            "limit": 100,
            "offered_per_s": 300,
            "seconds": seconds,
            "admitted_per_second": per_second,
            "status_counts": {str(k): v for k, v in sorted(r["codes"].items())},
            "server_errors": sum(v for k, v in r["codes"].items() if k >= 500 or k < 0),
        }
        # audit completeness and chain
        aud_home = root / "audit"
        key2 = cli(aud_home, "keys", "create", "--user", "auditor")
        aud = Server(aud_home, env={"LLMHOST_RATE_LIMIT_RPS": "0"})
        codes = asyncio.run(
            closed_loop(aud.url, {"Authorization": f"Bearer {key2}"}, args.audit_requests)
        )
        rc = aud.stop()
        records = cli(
            aud_home,
            "audit",
            "search",
            "--user",
            "auditor",
            "--json",
            "--limit",
            str(args.audit_requests * 2),
        )
        verify = cli(aud_home, "audit", "verify")
        out["audit"] = {
            "requests": args.audit_requests,
            "status_counts": codes,
            "server_exit": rc,
            "records": len([x for x in records.splitlines() if x.strip()]),
            "verify": verify,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
