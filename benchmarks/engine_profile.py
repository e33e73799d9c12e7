"""Where a llama.cpp engine's time goes, without HTTP: runs closed-loop load in-process and
splits the wall time into llama_decode (prefill steps, decode-only steps) and everything else
(sampling, detokenizing, scheduling). Prints one JSON line.

    .venv/bin/python benchmarks/engine_profile.py MODEL.gguf [--concurrency 8] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import llama_cpp

from llmhost.engines import llamacpp_batch
from llmhost.engines.llamacpp import LlamaCppEngine
from llmhost.ops.bench import make_prompt
from llmhost.types import GenerationRequest, SamplingParams


async def main(args: argparse.Namespace) -> dict:
    steps: list[tuple[float, int, int]] = []  # seconds, tokens in batch, outputs
    real_decode = llama_cpp.llama_decode

    def timed_decode(ctx, batch):
        t0 = time.perf_counter()
        rc = real_decode(ctx, batch)
        n_out = sum(1 for i in range(batch.n_tokens) if batch.logits[i])
        steps.append((time.perf_counter() - t0, batch.n_tokens, n_out))
        return rc

    llamacpp_batch.C.llama_decode = timed_decode  # C is the llama_cpp module itself
    engine = LlamaCppEngine(
        args.model, threads=args.threads, parallel=args.parallel, ctx_size=args.ctx
    )
    await engine.start()
    counter = 0

    async def one() -> int:
        nonlocal counter
        counter += 1
        req = GenerationRequest(
            prompt=make_prompt(args.prompt_tokens, counter),
            sampling=SamplingParams(
                max_tokens=args.output_tokens, ignore_eos=True, temperature=1.0
            ),
        )
        n = 0
        async for d in engine.stream(req):
            n += len(d.token_ids)
        return n

    await one()  # warm-up
    steps.clear()
    remaining = args.requests

    async def worker() -> int:
        nonlocal remaining
        total = 0
        while remaining > 0:
            remaining -= 1
            total += await one()
        return total

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(worker() for _ in range(args.concurrency))))
    wall = time.perf_counter() - t0
    await engine.close()
    decode_only = [s for s in steps if s[1] == s[2]]
    prefill = [s for s in steps if s[1] != s[2]]
    in_decode = sum(s[0] for s in steps)
    return {
        "concurrency": args.concurrency,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "llama_decode_share": in_decode / wall,
        "prefill_steps": len(prefill),
        "prefill_s": sum(s[0] for s in prefill),
        "prefill_tokens": sum(s[1] - s[2] for s in prefill),
        "decode_only_steps": len(decode_only),
        "decode_only_step_ms_mean": 1000
        * sum(s[0] for s in decode_only)
        / max(len(decode_only), 1),
        "other_s": wall - in_decode,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
