"""What `n` costs: one request for n choices against one for a single choice of the same
length on llmhost (the n choices share the prompt's prefill and decode in one batch), and
llama.cpp's own llama-server, which has no `n`, answering n concurrent requests instead.

    PYTHONPATH=src .venv/bin/python benchmarks/n_choices.py            # the full run
    PYTHONPATH=src .venv/bin/python benchmarks/n_choices.py --smoke    # demo model, CI

Each measurement sends a prompt neither server has seen (fresh words every time, so no
prompt cache helps), `--prompt-words` long, and asks for `--output-tokens` tokens per choice
with ignore_eos, not streamed; the wall time is the request's (llama-server: until the last of
its n requests answers). A decode-only pair (an 8-word prompt) shows what n sequences cost
per step without a prompt to share: on a CPU, n sequences' decode is compute-bound, which sets
the floor of the n/1 ratio for both servers. Both get the same threads, sequences and context per
sequence; the model is the TinyLlama-shaped Q4_0 GGUF (random weights), built once into
$LLMHOST_BENCH_CACHE, as is llama-server (see servers.py). The sides alternate for `--rounds`
rounds; medians are reported.

Prints one JSON line last: the figures, the ratios and whether n=N costs at most 1.3x n=1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
from prefix_cache import start_llama_server, start_llmhost, tinyllama
from servers import CACHE, stop

from llmhost.ops.bench import make_prompt
from llmhost.store.demo import ensure_demo_model


async def timed(client: httpx.AsyncClient, url: str, body: dict, copies: int) -> float:
    """Seconds until every one of `copies` identical requests has answered."""
    t0 = time.perf_counter()
    rs = await asyncio.gather(
        *(client.post(url + "/v1/completions", json=body) for _ in range(copies))
    )
    wall = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
        want = body["max_tokens"] * body.get("n", 1)
        got = r.json()["usage"]["completion_tokens"]
        if got != want:
            raise RuntimeError(f"{url}: {got} completion tokens, expected {want}")
    return wall


def body(args: argparse.Namespace, n: int, words: int = 0) -> dict:
    return {
        "prompt": make_prompt(words or args.prompt_words, uuid.uuid4().hex),
        "max_tokens": args.output_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        **({"n": n} if n > 1 else {}),
    }


async def measure(args: argparse.Namespace, lh: str, ls: str | None) -> dict:
    runs: dict[str, list[float]] = {}
    short = 8  # words: the decode-only pair, what n sequences cost per step without a prompt

    async def side(c: httpx.AsyncClient, name: str, url: str, copies_for_n: bool) -> None:
        def put(key: str, wall: float) -> None:
            runs.setdefault(f"{name}_{key}", []).append(wall)

        n_body, copies = (body(args, 1), args.n) if copies_for_n else (body(args, args.n), 1)
        put("n1", await timed(c, url, body(args, 1), 1))
        put("n", await timed(c, url, n_body, copies))
        n_body, copies = (
            (body(args, 1, short), args.n) if copies_for_n else (body(args, args.n, short), 1)
        )
        put("decode_n1", await timed(c, url, body(args, 1, short), 1))
        put("decode_n", await timed(c, url, n_body, copies))

    async with httpx.AsyncClient(timeout=3600) as c:
        await timed(c, lh, body(args, 1) | {"max_tokens": 4}, 1)  # warm up
        if ls is not None:
            await timed(c, ls, body(args, 1) | {"max_tokens": 4}, 1)
        for _ in range(args.rounds):
            await side(c, "llmhost", lh, False)
            if ls is not None:  # no n: n concurrent requests
                await side(c, "llama_server", ls, True)
    return {k: round(statistics.median(v), 3) for k, v in runs.items()}


async def run(args: argparse.Namespace, model: Path) -> dict:
    lh_url, lh = start_llmhost(args, model, 1024)
    procs = [lh]
    try:
        ls_url = None
        if not args.no_llama_server:
            ls_url, ls = start_llama_server(args, model)
            procs.append(ls)
        wall = await measure(args, lh_url, ls_url)
    finally:
        stop(procs)
    report: dict = {"model": str(model), "config": vars(args) | {"model": str(model)}}
    report["wall_s"] = wall
    ratios = {}
    for name in ("llmhost", "llama_server"):
        if f"{name}_n" in wall:
            ratios[f"{name}_n_vs_n1"] = round(wall[f"{name}_n"] / wall[f"{name}_n1"], 3)
            ratios[f"{name}_decode_n_vs_n1"] = round(
                wall[f"{name}_decode_n"] / wall[f"{name}_decode_n1"], 3
            )
    if "llama_server_n" in wall:
        ratios["llmhost_n_vs_llama_server_n"] = round(wall["llmhost_n"] / wall["llama_server_n"], 3)
    report["ratios"] = ratios
    report["targets"] = {f"n{args.n}_le_1.3x_n1": ratios["llmhost_n_vs_n1"] <= 1.3}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="demo model, tiny workloads")
    ap.add_argument("--model", type=Path, help="GGUF (default: the TinyLlama-shaped Q4_0)")
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build)")
    ap.add_argument("--no-llama-server", action="store_true", help="llmhost only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048, help="context tokens per sequence")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.smoke:
        args.ctx, args.prompt_words, args.output_tokens, args.rounds = 512, 48, 8, 1
    model = args.model or (ensure_demo_model(CACHE) if args.smoke else tinyllama())
    t0 = time.perf_counter()
    report = asyncio.run(run(args, model))
    report["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
