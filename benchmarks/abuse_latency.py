"""Whether abusive inputs slow down everyone else on the same server. A real `llmhost serve`
(auth on, audit on with redacted prompts, the demo model on llama.cpp) on loopback; 8 normal
clients loop streaming chat completions and measure TTFT, while in the attack phases one
attacker sends, at a fixed rate without waiting for its answers, a rotation of the worst
inputs:

- GET /v1/models with a 64 KB query string and no credentials;
- an authenticated completion whose prompt is 150 KB of text built to make naive e-mail and
  phone regexes backtrack (runs of `a-`, `a.`, dotted domains, digits);
- an authenticated completion with a 20 MB JSON body, once with a Content-Length and once
  chunked (no length known up front), streamed from one reused 64 KB buffer.

Baseline (A) and attack (B) phases alternate, A B A B, so drift cancels; after each attack
the attacker's requests still in flight are waited for and the server is given time to catch
up (both bounded), so an attack does not leak into the next baseline. A 10 Hz probe of
/health runs in every phase. Prints one JSON line: per phase the TTFT p50/p90/p99 of the
normal streams, their failures and the /health latency; the p99 ratio B/A and the difference;
per round the p99s; the attacker's status codes per input. A normal request that times out
before its first token counts at the timeout, so a stalled server raises the percentiles
instead of dropping out of them. Exits 1 when the ratio exceeds --max-ratio, a normal request
failed or the server had not caught up before the next baseline: a regression gate.

    .venv/bin/python benchmarks/abuse_latency.py [--seconds 20] [--attack-rate 5] [--smoke]
    .venv/bin/python benchmarks/abuse_latency.py --engine fake     # the gateway alone
    .venv/bin/python benchmarks/abuse_latency.py --attacks prompt_150k,body_20m   # some inputs

The server keeps its defaults except the instance rate limit, raised so that the normal
clients are never refused. Every request has a timeout and every phase an end, so a server
that stalls makes the run fail, not hang: the measuring takes at most 60 s + rounds x
(2 x seconds + 4 x timeout), plus the server's start and stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPT = [{"role": "user", "content": "Write one short sentence about the sea."}]
QUERY_BYTES = 64 * 1024
PROMPT_BYTES = 150 * 1024
BODY_BYTES = 20 * 1024 * 1024
CHUNK = 64 * 1024
HEALTH_HZ = 10.0
HEALTH_TIMEOUT = 1.0
KINDS = ("query_64k_unauth", "prompt_150k", "body_20m", "body_20m_chunked")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(home: Path, *args: str) -> str:
    env = {**os.environ, "LLMHOST_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "llmhost", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"llmhost {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


class Server:
    """`llmhost serve` with the server's defaults for auth, audit and redaction; only the
    instance rate limit is raised, so that refusals never count as failures of the normal
    clients (the limiter still runs on every request)."""

    def __init__(self, home: Path, engine: str, model: Path | None, parallel: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "server.log"
        env = {**os.environ, "LLMHOST_HOME": str(home), "LLMHOST_RATE_LIMIT_RPS": "1000000"}
        cmd = [sys.executable, "-m", "llmhost", "serve", "--engine", engine]
        cmd += [str(model)] if model is not None else []
        cmd += ["--port", str(self.port), "--parallel", str(parallel), "--log-level", "warning"]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL: a server whose event loop is stuck cannot drain."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        return self.proc.returncode


def hard_text(size: int) -> str:
    """`size` characters, URL-safe (no spaces, no `+`), that are slow for regexes with
    unbounded repetition followed by something that never comes: `\\b[\\w.-]+@` over a long
    `a-a-a-…` or `a.a.a.…` run tries every word boundary and scans to the end from each;
    `@a.a.a….1` does the same to a domain pattern; long digit runs and `1.2.3…` probe ID,
    card, phone and IP patterns."""
    shapes = ("a-" * 4096, "a." * 4096, "x@" + "a." * 4094 + "1", "7" * 8192, "1." * 4096)
    parts: list[str] = []
    total = 0
    while total < size:
        for shape in shapes:
            parts.append(shape)
            total += len(shape)
    return "".join(parts)[:size]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)


def dist(xs: list[float]) -> dict[str, float | None]:
    return {"p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99)}


@dataclass
class Phase:
    """What the normal clients and the health probe saw in one kind of phase. A request that
    timed out before its first token enters the TTFT figures at the timeout (a lower bound),
    and an unanswered probe at its own timeout, so a stalled server raises the percentiles
    instead of vanishing from them."""

    name: str
    ttft_ms: list[float] = field(default_factory=list)
    requests: int = 0
    completed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    ttft_censored: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failed: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    @classmethod
    def merged(cls, name: str, phases: list[Phase]) -> Phase:
        out = cls(name)
        for p in phases:
            out.ttft_ms += p.ttft_ms
            out.health_ms += p.health_ms
            out.requests += p.requests
            out.completed += p.completed
            out.ttft_censored += p.ttft_censored
            out.health_failed += p.health_failed
            for why, n in p.failures.items():
                out.failures[why] = out.failures.get(why, 0) + n
        return out

    def report(self) -> dict:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "failures": self.failures,
            "ttft_ms": dist(self.ttft_ms),
            "ttft_censored": self.ttft_censored,
            "health_ms": dist(self.health_ms),
            "health_failed": self.health_failed,
        }


@dataclass
class Config:
    url: str
    model: str
    key: str
    attack_key: str
    streams: int
    max_tokens: int
    seconds: float
    timeout: float
    attack_rate: float
    attacks: tuple[str, ...] = KINDS


async def normal_request(client: httpx.AsyncClient, cfg: Config, phase: Phase) -> None:
    """One streaming chat completion: TTFT to the first chunk carrying text; any status but
    200, a broken or unparsable stream, a missing [DONE] or a timeout is a failure."""
    body = {
        "model": cfg.model,
        "messages": PROMPT,
        "max_tokens": cfg.max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {cfg.key}"}
    t0 = time.perf_counter()
    first: list[float] = []
    phase.requests += 1

    async def go() -> str | None:
        async with client.stream(
            "POST", cfg.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return f"status {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return None if first else "no content"
                chunk = json.loads(data)
                if "error" in chunk:
                    return "error in stream"
                if not first and any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices", ())
                ):
                    first.append(time.perf_counter() - t0)
        return "no [DONE]"

    try:
        why = await asyncio.wait_for(go(), cfg.timeout)
    except asyncio.TimeoutError:
        why = "timeout"
    except (httpx.HTTPError, ValueError) as exc:
        why = type(exc).__name__
    if first:
        phase.ttft_ms.append(first[0] * 1000)
    elif why == "timeout":
        phase.ttft_ms.append(cfg.timeout * 1000)
        phase.ttft_censored += 1
    if why is None:
        phase.completed += 1
    else:
        phase.fail(why)


async def normal_client(client: httpx.AsyncClient, cfg: Config, phase: Phase, end: float) -> None:
    while time.perf_counter() < end:
        await normal_request(client, cfg, phase)


async def probe_health(client: httpx.AsyncClient, url: str, phase: Phase, end: float) -> None:
    """Open loop at HEALTH_HZ: latency counts from the scheduled time; a probe not answered
    within HEALTH_TIMEOUT counts as failed and enters the figures at that timeout."""

    async def one(due: float) -> None:
        try:
            r = await asyncio.wait_for(client.get(url + "/health"), HEALTH_TIMEOUT)
            if r.status_code == 200:
                phase.health_ms.append((time.perf_counter() - due) * 1000)
                return
        except (asyncio.TimeoutError, httpx.HTTPError):
            phase.health_ms.append(HEALTH_TIMEOUT * 1000)
        phase.health_failed += 1

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    i = 0
    while (due := start + i / HEALTH_HZ) < end:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks)


class Attacker:
    """Sends the rotation at a fixed rate, never waiting for an answer before the next."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.statuses: dict[str, dict[str, int]] = {k: {} for k in cfg.attacks}
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.prompt = json.dumps(
            {"model": cfg.model, "prompt": hard_text(PROMPT_BYTES), "max_tokens": 1}
        ).encode()
        # A 20 MB completion request that is valid JSON: one 64 KB buffer of words sent
        # again and again between the head and the tail, never 20 MB in memory here.
        head = json.dumps({"model": cfg.model, "max_tokens": 1, "prompt": "#"}).encode()
        self.body_head, _, self.body_tail = head.partition(b"#")
        self.filler = b"hello world " * (CHUNK // 12)
        self.n_fill = (BODY_BYTES - len(head)) // len(self.filler)
        self.body_len = len(head) - 1 + self.n_fill * len(self.filler)

    async def big_body(self) -> AsyncIterator[bytes]:
        yield self.body_head
        for _ in range(self.n_fill):
            yield self.filler
        yield self.body_tail

    async def long_query(self) -> int:
        """httpx refuses URLs over 64 KiB, so this one request is written by hand."""
        u = httpx.URL(self.cfg.url)
        target = "/v1/models?q=" + hard_text(QUERY_BYTES - len("q="))
        reader, writer = await asyncio.open_connection(u.host, u.port)
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            return int((await reader.readline()).split()[1])
        finally:
            writer.close()

    async def _send(self, client: httpx.AsyncClient, kind: str) -> None:
        headers = {
            "Authorization": f"Bearer {self.cfg.attack_key}",
            "Content-Type": "application/json",
        }
        url = self.cfg.url + "/v1/completions"
        if kind == "body_20m":
            headers["Content-Length"] = str(self.body_len)
        try:
            if kind == "query_64k_unauth":
                status = await asyncio.wait_for(self.long_query(), self.cfg.timeout)
            else:
                content = self.prompt if kind == "prompt_150k" else self.big_body()
                req = client.post(url, content=content, headers=headers)
                status = (await asyncio.wait_for(req, self.cfg.timeout)).status_code
            outcome = str(status)
        except asyncio.TimeoutError:
            outcome = "timeout"
        except Exception as exc:  # any way the request can fail is a figure, not a crash
            outcome = type(exc).__name__
        self.statuses[kind][outcome] = self.statuses[kind].get(outcome, 0) + 1

    async def run(self, client: httpx.AsyncClient, end: float) -> None:
        start = time.perf_counter()
        i = 0
        while (due := start + i / self.cfg.attack_rate) < end:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            kind = self.cfg.attacks[self.sent % len(self.cfg.attacks)]
            task = asyncio.create_task(self._send(client, kind))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.sent += 1
            i += 1

    async def drain(self) -> None:
        """The requests still in flight; each has its own timeout, so this ends."""
        if self.tasks:
            await asyncio.wait(set(self.tasks))


async def settle(client: httpx.AsyncClient, url: str, limit: float) -> float | None:
    """After an attack phase, wait (up to `limit` s) until /health answers within 50 ms
    again, so the next baseline starts on a server that has caught up. The seconds waited,
    or None when it never did."""
    t0 = time.perf_counter()
    while (waited := time.perf_counter() - t0) < limit:
        with contextlib.suppress(httpx.HTTPError):
            r = await client.get(url + "/health", timeout=max(0.1, limit - waited))
            if r.status_code == 200 and time.perf_counter() - t0 - waited < 0.05:
                return round(waited, 2)
        await asyncio.sleep(0.1)
    return None


async def run_phase(
    cfg: Config, phase: Phase, clients: dict[str, httpx.AsyncClient], attacker: Attacker | None
) -> None:
    end = time.perf_counter() + cfg.seconds
    jobs = [normal_client(clients["normal"], cfg, phase, end) for _ in range(cfg.streams)]
    jobs.append(probe_health(clients["health"], cfg.url, phase, end))
    if attacker is not None:
        jobs.append(attacker.run(clients["attack"], end))
    await asyncio.gather(*jobs)


async def measure(cfg: Config, rounds: int) -> dict:
    limits = httpx.Limits(max_connections=cfg.streams * 2, max_keepalive_connections=cfg.streams)
    # One pool each, so attack connections never queue the normal clients inside this process.
    async with (
        httpx.AsyncClient(timeout=cfg.timeout, limits=limits) as normal,
        httpx.AsyncClient(timeout=cfg.timeout, limits=httpx.Limits(max_connections=200)) as attack,
        httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as health,
    ):
        clients = {"normal": normal, "attack": attack, "health": health}
        warm = Phase("warm-up")

        async def warm_up() -> None:
            for _ in range(3):
                await normal_request(normal, cfg, warm)

        await asyncio.gather(*(warm_up() for _ in range(cfg.streams)))
        if warm.failed:
            raise RuntimeError(f"warm-up requests failed: {warm.failures}")
        attacker = Attacker(cfg)
        bases: list[Phase] = []
        attacks: list[Phase] = []
        settled: list[float | None] = []
        for i in range(rounds):
            bases.append(Phase(f"baseline {i + 1}"))
            await run_phase(cfg, bases[-1], clients, None)
            attacks.append(Phase(f"attack {i + 1}"))
            await run_phase(cfg, attacks[-1], clients, attacker)
            await attacker.drain()
            settled.append(await settle(health, cfg.url, cfg.timeout))
    return {"baseline": bases, "attack": attacks, "attacker": attacker, "settle_s": settled}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="llamacpp", choices=("llamacpp", "fake"))
    ap.add_argument("--model", type=Path, help="GGUF to serve [the demo model, built here]")
    ap.add_argument("--seconds", type=float, default=20, help="length of each phase")
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    ap.add_argument("--streams", type=int, default=8, help="concurrent normal clients")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--attack-rate", type=float, default=5.0, help="attack requests per second")
    ap.add_argument("--timeout", type=float, default=30, help="seconds per request")
    ap.add_argument(
        "--attacks",
        default=",".join(KINDS),
        help="which inputs the attacker rotates through, comma-separated [all]",
    )
    ap.add_argument("--max-ratio", type=float, default=1.2, help="p99 TTFT B/A allowed")
    ap.add_argument("--smoke", action="store_true", help="short and lenient, for CI")
    args = ap.parse_args()
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if not attacks or set(attacks) - set(KINDS):
        ap.error(f"--attacks: one or more of {', '.join(KINDS)}")
    if args.smoke:
        args.seconds, args.rounds, args.timeout = 3, 1, 20
        args.max_ratio = max(args.max_ratio, 10.0)
    root = Path(tempfile.mkdtemp(prefix="llmhost-abuse-"))
    server: Server | None = None
    out: dict = {
        "engine": args.engine,
        "cores": os.cpu_count(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "attack_rate": args.attack_rate,
        "attacks": list(attacks),
        "timeout_s": args.timeout,
    }
    res: dict | None = None
    try:
        home = root / "home"
        home.mkdir()
        model = args.model
        if args.engine == "llamacpp" and model is None:
            cli(home, "demo-model", str(root / "model"), "--format", "gguf")
            model = root / "model" / "llmhost-demo.gguf"
        key = cli(home, "keys", "create", "--user", "normal")
        attack_key = cli(home, "keys", "create", "--user", "attacker")
        server = Server(home, args.engine, model, parallel=max(args.streams, 1))
        server.wait_ready()
        models = httpx.get(
            server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()
        cfg = Config(
            url=server.url,
            model=models["data"][0]["id"],
            key=key,
            attack_key=attack_key,
            streams=args.streams,
            max_tokens=args.max_tokens,
            seconds=args.seconds,
            timeout=args.timeout,
            attack_rate=args.attack_rate,
            attacks=attacks,
        )
        out["model"] = cfg.model
        # Each phase ends within seconds + timeout, each drain and settle within timeout.
        bound = 60 + args.rounds * (2 * args.seconds + 4 * args.timeout)
        res = asyncio.run(asyncio.wait_for(measure(cfg, args.rounds), bound))
    except (RuntimeError, OSError, ValueError, httpx.HTTPError, asyncio.TimeoutError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        if server is not None:
            out["server_exit"] = server.stop()
            if res is None:
                out["server_log_tail"] = server.log.read_text(errors="replace")[-1500:]
        shutil.rmtree(root, ignore_errors=True)
    if res is None:
        print(json.dumps(out))
        print(f"FAIL: {out['error']}", file=sys.stderr)
        return 1
    base = Phase.merged("baseline", res["baseline"])
    attack = Phase.merged("attack", res["attack"])
    attacker = res["attacker"]
    out["baseline"] = base.report()
    out["attack"] = attack.report()
    out["per_round"] = [
        {
            "baseline_ttft_p99_ms": pct(b.ttft_ms, 99),
            "attack_ttft_p99_ms": pct(a.ttft_ms, 99),
            "baseline_failed": b.failed,
            "attack_failed": a.failed,
        }
        for b, a in zip(res["baseline"], res["attack"], strict=True)
    ]
    out["attacker"] = {"sent": attacker.sent, "status": attacker.statuses}
    out["settle_s"] = res["settle_s"]
    b99, a99 = out["baseline"]["ttft_ms"]["p99"], out["attack"]["ttft_ms"]["p99"]
    # A baseline whose p99 is a timeout was itself stalled: there is no ratio to give.
    out["ttft_p99_ratio"] = None if b99 == args.timeout * 1000 else ratio(a99, b99)
    out["ttft_p99_added_ms"] = round(a99 - b99, 2) if a99 is not None and b99 is not None else None
    out["health_p99_ratio"] = ratio(
        out["attack"]["health_ms"]["p99"], out["baseline"]["health_ms"]["p99"]
    )
    out["max_ratio"] = args.max_ratio
    problems = []
    if base.failed or attack.failed:
        problems.append(f"failed normal requests: {base.failed} baseline, {attack.failed} attack")
    if out["ttft_p99_ratio"] is None or out["ttft_p99_ratio"] > args.max_ratio:
        problems.append(f"p99 TTFT ratio {out['ttft_p99_ratio']} > {args.max_ratio}")
    if None in out["settle_s"]:
        problems.append(f"the server did not recover within {args.timeout:g} s of an attack")
    out["pass"] = not problems
    print(json.dumps(out))
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
