"""Prefix caching on real chat workloads, side by side with llama.cpp's own llama-server (its
`--cache-prompt`, on by default, and host-memory prompt cache), and against llmhost itself with
caching off (`cache_prompt: false` on every request).

    PYTHONPATH=src .venv/bin/python benchmarks/prefix_cache.py              # the full run
    PYTHONPATH=src .venv/bin/python benchmarks/prefix_cache.py --soak 600   # + a 10-min soak
    PYTHONPATH=src .venv/bin/python benchmarks/prefix_cache.py --smoke      # demo model, CI

Workloads (`llmhost bench`'s scenarios, streamed, ignore_eos):
- multi-turn: 8 conversations x 6 turns at once behind one 512-word system prompt, 32-word
  user turns, 64 output tokens a turn; each turn resends the whole conversation.
- shared-prefix: 8 concurrent single-turn chats behind one 1,024-word system prompt that
  neither server has seen before (every run draws a new one).
Each run of a workload draws prompts of its own; the two servers alternate for `--rounds`
rounds. Both get the same threads, sequences and context per sequence. The model is the
TinyLlama-shaped Q4_0 GGUF (random weights: the timings are the real model's, the text is
not), built once into $LLMHOST_BENCH_CACHE, as is llama-server (see servers.py).

The soak replays the multi-turn workload for the given seconds with a small host cache budget
and samples llmhost's RSS and `llmhost_prompt_cache_bytes`: the cache must stay within its
budget and RSS must not grow past the budget over the first round's.

Prints one JSON line last: the figures, the ratios and which targets were met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import psutil
from servers import CACHE, free_port, llama_server_binary, start, stop

from llmhost.ops.bench import BenchConfig, Scenario, compare, run_scenarios
from llmhost.store.demo import TINYLLAMA_SHAPE, ensure_demo_model, ensure_model

MIB = 1 << 20


def tinyllama() -> Path:
    path = CACHE / "tinyllama-q4_0" / "llmhost-tinyllama.gguf"
    return ensure_model(path, TINYLLAMA_SHAPE, "q4_0")


def start_llmhost(args: argparse.Namespace, model: Path, cache_mb: int) -> tuple[str, object]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmhost", "serve", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--threads", str(args.threads), "--parallel", str(args.parallel)]
    cmd += ["--ctx-size", str(args.ctx), "--no-auth", "--log-level", "warning"]
    env = {
        **os.environ,
        "LLMHOST_HOME": str(CACHE / "home"),
        "LLMHOST_PROMPT_CACHE_MB": str(cache_mb),
        "LLMHOST_RATE_LIMIT_RPS": "0",  # a benchmark, not a tenant
    }
    url = f"http://127.0.0.1:{port}"
    return url, start(cmd, url + "/ready", CACHE / "prefix-logs" / f"llmhost-{port}.log", env)


def start_llama_server(args: argparse.Namespace, model: Path) -> tuple[str, object]:
    port = free_port()
    cmd = [str(args.llama_server or llama_server_binary()), "-m", str(model), "--jinja"]
    cmd += ["-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.parallel)]
    cmd += ["-c", str(args.parallel * args.ctx), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return url, start(cmd, url + "/health", CACHE / "prefix-logs" / "llama-server.log")


def cfg(args: argparse.Namespace, url: str, system: int, cache: bool = True) -> BenchConfig:
    return BenchConfig(
        url=url,
        prompt_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        system_tokens=system,
        cache_prompt=cache,
    )


def turn(summary: dict, n: int) -> float:
    by = {t["turn"]: t["p50"] for t in summary.get("ttft_by_turn_ms", [])}
    return by.get(n, float("nan"))


def brief(summary: dict) -> dict:
    keys = ("completed", "failed", "errors", "prompt_tokens", "output_throughput")
    out = {k: summary[k] for k in keys}
    out["ttft_ms"] = {k: round(summary["ttft_ms"][k], 1) for k in ("p50", "p90")}
    out["tpot_ms_p50"] = round(summary["tpot_ms"]["p50"], 1)
    if "ttft_by_turn_ms" in summary:
        out["ttft_p50_by_turn_ms"] = [round(t["p50"]) for t in summary["ttft_by_turn_ms"]]
    return out


async def side_by_side(args, lh: str, ls: str | None, sc: Scenario, system: int) -> dict:
    """llmhost (A) against llama-server (B) alternately, then llmhost with caching off."""
    out: dict = {}
    if ls is not None:
        (rep,) = await compare(cfg(args, lh, system), cfg(args, ls, system), [sc], args.rounds)
        out["llmhost"], out["llama_server"] = brief(rep["a"]), brief(rep["b"])
        a, b = rep["a"], rep["b"]
        out["ratio_vs_llama_server"] = {
            "ttft_p50": a["ttft_ms"]["p50"] / b["ttft_ms"]["p50"],
            "ttft_p90": a["ttft_ms"]["p90"] / b["ttft_ms"]["p90"],
            "output_tok_s": a["output_throughput"] / b["output_throughput"],
        }
        on = a
    else:
        (on,) = await run_scenarios(cfg(args, lh, system), [sc])
        out["llmhost"] = brief(on)
    if not args.no_cache_off:
        (off,) = await run_scenarios(cfg(args, lh, system, cache=False), [sc])
        out["llmhost_cache_off"] = brief(off)
        out["ratio_vs_cache_off"] = {"ttft_p50": on["ttft_ms"]["p50"] / off["ttft_ms"]["p50"]}
        if sc.kind == "multi-turn":
            last = sc.turns
            out["ratio_vs_cache_off"][f"ttft_p50_turn{last}"] = turn(on, last) / turn(off, last)
    return out


async def soak(args, url: str, proc, budget_mb: int) -> dict:
    """The multi-turn workload over and over for `args.soak` seconds; RSS and cache bytes."""
    sc = Scenario("soak", kind="multi-turn", conversations=args.conversations, turns=args.turns)
    rss = psutil.Process(proc.pid)
    samples: list[tuple[float, int, float]] = []
    stop_at = time.monotonic() + args.soak

    async def sample() -> None:
        async with httpx.AsyncClient() as client:
            while time.monotonic() < stop_at:
                text = (await client.get(url + "/metrics")).text
                cache = next(
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("llmhost_prompt_cache_bytes")
                )
                samples.append((time.monotonic(), rss.memory_info().rss, cache))
                await asyncio.sleep(2)

    sampler = asyncio.create_task(sample())
    rounds, first_rss = 0, None
    while time.monotonic() < stop_at:
        (s,) = await run_scenarios(cfg(args, url, args.system_tokens), [sc], warmup=0)
        rounds += 1
        if s["failed"]:
            raise RuntimeError(f"soak round failed: {s['errors']}")
        if first_rss is None:
            first_rss = rss.memory_info().rss
    await sampler
    peak_rss = max(r for _, r, _ in samples)
    peak_cache = max(c for _, _, c in samples)
    return {
        "seconds": args.soak,
        "rounds": rounds,
        "budget_mib": budget_mb,
        "peak_cache_mib": round(peak_cache / MIB, 1),
        "rss_after_first_round_mib": round(first_rss / MIB, 1),
        "peak_rss_mib": round(peak_rss / MIB, 1),
        "rss_growth_mib": round((peak_rss - first_rss) / MIB, 1),
        "within_budget": peak_cache <= budget_mb * MIB
        and peak_rss - first_rss <= budget_mb * MIB + 64 * MIB,
    }


def targets(report: dict) -> dict[str, bool]:
    """The figures the prefix cache must reach (`None` where a side did not run)."""
    mt, sp = report.get("multi_turn", {}), report.get("shared_prefix", {})
    vs, off = mt.get("ratio_vs_llama_server"), mt.get("ratio_vs_cache_off")
    svs, soff = sp.get("ratio_vs_llama_server"), sp.get("ratio_vs_cache_off")
    turns = report["config"]["turns"]
    out = {
        "multi_turn_ttft_p50_le_1x_llama_server": vs and vs["ttft_p50"] <= 1.0,
        "multi_turn_ttft_p90_le_1x_llama_server": vs and vs["ttft_p90"] <= 1.0,
        "multi_turn_tok_s_ge_1x_llama_server": vs and vs["output_tok_s"] >= 1.0,
        f"multi_turn_turn{turns}_ttft_le_0.3x_cache_off": off
        and off[f"ttft_p50_turn{turns}"] <= 0.3,
        "shared_prefix_ttft_p50_le_1x_llama_server": svs and svs["ttft_p50"] <= 1.0,
        "shared_prefix_ttft_p50_le_0.3x_cache_off": soff and soff["ttft_p50"] <= 0.3,
    }
    if "soak" in report:
        out["soak_within_budget"] = report["soak"]["within_budget"]
    return {k: (None if v is None else bool(v)) for k, v in out.items()}


async def workloads(args: argparse.Namespace, model: Path, report: dict) -> None:
    """Both chat workloads, llmhost against llama-server and against itself uncached."""
    procs = []
    try:
        lh, p = start_llmhost(args, model, args.cache_mb)
        procs.append(p)
        ls = None
        if not args.no_llama_server:
            ls, p = start_llama_server(args, model)
            procs.append(p)
        mt = Scenario(
            "multi-turn", kind="multi-turn", conversations=args.conversations, turns=args.turns
        )
        report["multi_turn"] = await side_by_side(args, lh, ls, mt, args.system_tokens)
        print(f"[bench] multi-turn: {json.dumps(report['multi_turn'])}", file=sys.stderr)
        sp = Scenario(
            "shared-prefix",
            kind="shared-prefix",
            concurrency=args.shared_requests,
            requests=args.shared_requests,
        )
        report["shared_prefix"] = await side_by_side(args, lh, ls, sp, args.shared_system_tokens)
        print(f"[bench] shared-prefix: {json.dumps(report['shared_prefix'])}", file=sys.stderr)
    finally:
        stop(procs)


async def run(args: argparse.Namespace, model: Path) -> dict:
    report: dict = {"model": str(model), "config": vars(args) | {"model": str(model)}}
    report["config"]["llama_server"] = str(args.llama_server or "")
    if not args.soak_only:
        await workloads(args, model, report)
    if args.soak:
        url, p = start_llmhost(args, model, args.soak_cache_mb)
        try:
            report["soak"] = await soak(args, url, p, args.soak_cache_mb)
        finally:
            stop([p])
    report["targets"] = targets(report)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="demo model, tiny workloads")
    ap.add_argument("--model", type=Path, help="GGUF (default: the TinyLlama-shaped Q4_0)")
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build)")
    ap.add_argument("--no-llama-server", action="store_true", help="llmhost only")
    ap.add_argument("--no-cache-off", action="store_true", help="skip the caching-off runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=2048, help="context tokens per sequence")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=512, help="multi-turn system prompt")
    ap.add_argument("--user-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--shared-system-tokens", type=int, default=1024)
    ap.add_argument("--shared-requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=1024, help="llmhost's prompt_cache_mb")
    ap.add_argument("--soak", type=float, default=0, help="seconds of multi-turn soak")
    ap.add_argument("--soak-cache-mb", type=int, default=128)
    ap.add_argument("--soak-only", action="store_true", help="skip the side-by-side runs")
    args = ap.parse_args()
    if args.smoke:
        args.parallel, args.ctx, args.conversations, args.turns = 4, 512, 2, 3
        args.system_tokens, args.shared_system_tokens, args.shared_requests = 64, 128, 4
        args.output_tokens, args.user_tokens, args.rounds = 8, 8, 1
        args.soak, args.soak_cache_mb = min(args.soak, 10), 1
    model = args.model or (ensure_demo_model(CACHE) if args.smoke else tinyllama())
    t0 = time.perf_counter()
    report = asyncio.run(run(args, model))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
