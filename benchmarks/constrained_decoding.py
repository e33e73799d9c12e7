"""What constrained decoding costs in the llama.cpp engine, in-process (no HTTP): output tokens/s
of a 20-field JSON schema vs the same requests unconstrained, at 1 and 8 concurrent streams, and
the grammar compile time (first and cached). Prints one JSON line.

    .venv/bin/python benchmarks/constrained_decoding.py            # TinyLlama-shaped Q4_0 GGUF
    .venv/bin/python benchmarks/constrained_decoding.py --smoke    # the tiny demo model, seconds

The model is built once into $LLMHOST_BENCH_CACHE (default ~/.cache/llmhost-bench), as
vs_llama_server.sh builds it: TinyLlama's exact shape with random weights. Lengths match: each
request first runs constrained (it ends when the JSON is complete), then the same prompt and
seed run unconstrained with max_tokens set to that length and EOS ignored. Rounds alternate
the two so drift hits both alike; the figures are the totals over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from llmhost.engines.llamacpp import LlamaCppEngine
from llmhost.ops.bench import make_prompt
from llmhost.store.demo import DEMO_SHAPE, TINYLLAMA_SHAPE, ensure_model
from llmhost.types import Constraint, GenerationRequest, SamplingParams


def _str(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


PROPERTIES = {
    "id": _int(0, 1_000_000),
    "name": _str(24),
    "email": _str(32),
    "age": _int(0, 130),
    "active": {"type": "boolean"},
    "score": {"type": "number"},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": _str(12), "maxItems": 4},
    "city": _str(20),
    "country": _str(20),
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    "phone": _str(16),
    "verified": {"type": "boolean"},
    "level": _int(1, 10),
    "status": {"enum": ["new", "open", "closed"]},
    "address": {
        "type": "object",
        "properties": {"street": _str(30), "number": _int(1, 9999)},
        "required": ["street", "number"],
        "additionalProperties": False,
    },
    "created": _str(25),
    "notes": _str(40),
    "rating": _int(1, 5),
    "priority": {"enum": ["low", "medium", "high"]},
}
SCHEMA20 = {
    "type": "object",
    "properties": PROPERTIES,
    "required": list(PROPERTIES),
    "additionalProperties": False,
}


def model_path(smoke: bool) -> Path:
    cache = Path(os.environ.get("LLMHOST_BENCH_CACHE", Path.home() / ".cache/llmhost-bench"))
    shape, folder, quant = (
        ("demo", "demo", "f32") if smoke else ("tinyllama", "tinyllama-q4_0", "q4_0")
    )
    path = cache / folder / f"llmhost-{shape}.gguf"
    return ensure_model(path, DEMO_SHAPE if smoke else TINYLLAMA_SHAPE, quant)


async def generate(engine, prompt: str, seed: int, constraint, max_tokens: int) -> int:
    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        constraint=constraint,
        ignore_eos=constraint is None,
    )
    n = 0
    async for d in engine.stream(GenerationRequest(prompt=prompt, sampling=sp)):
        n += len(d.token_ids)
    return n


async def closed_loop(engine, jobs: list[tuple[str, int, int]], constraint, conc: int):
    """Run `jobs` (prompt, seed, max_tokens) with `conc` in flight; token counts and wall s."""
    queue = list(enumerate(jobs))
    counts = [0] * len(jobs)

    async def worker() -> None:
        while queue:
            i, (prompt, seed, max_tokens) = queue.pop(0)
            counts[i] = await generate(engine, prompt, seed, constraint, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return counts, time.perf_counter() - t0


async def compare(engine, constraint, conc: int, n_req: int, rounds: int, cap: int) -> dict:
    totals = {"constrained": [0, 0.0], "unconstrained": [0, 0.0]}
    finished = 0
    for r in range(rounds):
        jobs = [(make_prompt(32, f"{conc}-{r}-{i}"), 1000 * r + i, cap) for i in range(n_req)]
        counts, wall = await closed_loop(engine, jobs, constraint, conc)
        finished += sum(1 for c in counts if c < cap)
        totals["constrained"][0] += sum(counts)
        totals["constrained"][1] += wall
        same = [(p, s, n) for (p, s, _), n in zip(jobs, counts, strict=True)]
        counts2, wall2 = await closed_loop(engine, same, None, conc)
        assert counts2 == counts, "lengths must match"
        totals["unconstrained"][0] += sum(counts2)
        totals["unconstrained"][1] += wall2
    out = {k: round(v[0] / v[1], 2) for k, v in totals.items()}
    out["ratio"] = round(out["constrained"] / out["unconstrained"], 3)
    out["tokens"] = totals["constrained"][0]
    out["complete_json"] = f"{finished}/{rounds * n_req}"
    return out


async def main(args: argparse.Namespace) -> dict:
    path = model_path(args.smoke)
    engine = LlamaCppEngine(path, threads=args.threads, parallel=8, ctx_size=args.ctx)
    await engine.start()
    compiler = engine._grammars
    assert compiler is not None
    t0 = time.perf_counter()
    compiler.tokenizer()
    tokenizer_ms = (time.perf_counter() - t0) * 1e3
    constraint = Constraint("json_schema", json.dumps(SCHEMA20))
    t0 = time.perf_counter()
    compiler.compile(constraint)
    first_ms = (time.perf_counter() - t0) * 1e3
    cached_ms = 1e9  # a cached compile is a lookup: its best of 5, free of preemption
    for _ in range(5):
        t0 = time.perf_counter()
        compiler.compile(constraint)
        cached_ms = min(cached_ms, (time.perf_counter() - t0) * 1e3)
    # The first long generation pays one-off allocations in llama.cpp.
    warm = [(make_prompt(32, "warm"), 0, args.max_tokens)]
    await closed_loop(engine, warm, None, 1)
    await closed_loop(engine, warm, constraint, 1)
    n1, n8 = (2, 8) if args.smoke else (args.requests_1, args.requests_8)
    rounds = 1 if args.smoke else args.rounds
    result = {
        "model": f"{'demo' if args.smoke else 'tinyllama q4_0'} random weights",
        "vocab": engine._n_vocab,
        "threads": args.threads,
        "schema_fields": len(PROPERTIES),
        "compile_ms": {
            "tokenizer_once": round(tokenizer_ms, 1),
            "first": round(first_ms, 2),
            "cached": round(cached_ms, 4),
        },
        "c1_tok_s": await compare(engine, constraint, 1, n1, rounds, args.max_tokens),
        "c8_tok_s": await compare(engine, constraint, 8, n8, rounds, args.max_tokens),
    }
    await engine.close()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny demo model, a few requests")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    ap.add_argument("--requests-1", type=int, default=3, help="requests per round at 1 stream")
    ap.add_argument("--requests-8", type=int, default=8, help="requests per round at 8 streams")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=400)
    print(json.dumps(asyncio.run(main(ap.parse_args()))))
