"""The transformers engine against the deployment guide's reference service
(`reference_server.py`: FastAPI + `model.generate`), same model folder, dtype and threads, one
server at a time on this machine. Prints one JSON line:

- single-stream output tok/s (requests one after another) and the ratio llmhost / reference;
- aggregate output tok/s with `--concurrency` requests at once, and the ratio;
- resident memory (RSS, whole process tree) after the runs, fp32 against `--quantization int8`;
- int8 single-stream tok/s.

Default model: a TinyLlama-1.1B-shaped Llama (random weights, real tokenizer) built once into
~/.cache/llmhost-bench/tinyllama-hf. `--smoke` uses the tiny demo shape and few tokens.

    .venv/bin/python benchmarks/transformers_vs_reference.py [--dtype float32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("LLMHOST_BENCH_CACHE", Path.home() / ".cache" / "llmhost-bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(shape_name: str) -> Path:
    from llmhost.store.demo import DEMO_SHAPE, TINYLLAMA_SHAPE, build_model

    shape = {"demo": DEMO_SHAPE, "tinyllama": TINYLLAMA_SHAPE}[shape_name]
    root = CACHE / f"{shape_name}-hf"
    if not (root / "hf" / "model.safetensors").exists():
        print(f"building a {shape_name}-shaped HF model in {root}", file=sys.stderr)
        build_model(root, shape=shape, formats=("hf",), name=f"llmhost-{shape_name}")
    return root / "hf"


class Proc:
    """A server subprocess, ready once `ready_path` answers 200."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, ready_path: str):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{cmd[:4]} did not become ready")

    def rss(self) -> int:
        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def reference(model: Path, dtype: str, threads: int, tokens: int) -> tuple[Proc, callable]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "reference_server:app"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    env = {
        "REF_MODEL": str(model),
        "REF_DTYPE": dtype,
        "REF_THREADS": str(threads),
        "REF_TOKENS": str(tokens),
    }
    proc = Proc(cmd, env, port, "/docs")

    async def call(client: httpx.AsyncClient, prompt: str) -> int:
        r = await client.post(proc.url + "/generate", params={"prompt": prompt})
        r.raise_for_status()
        return tokens

    return proc, call


def llmhost(model: Path, dtype: str, threads: int, tokens: int, parallel: int, *extra: str):
    port = free_port()
    home = tempfile.mkdtemp(prefix="llmhost-bench-")
    cmd = [sys.executable, "-m", "llmhost", "serve", str(model), "--engine", "transformers"]
    cmd += ["--port", str(port), "--no-auth", "--threads", str(threads), "--dtype", dtype]
    cmd += ["--parallel", str(parallel), "--log-level", "warning", *extra]
    proc = Proc(cmd, {"LLMHOST_HOME": home}, port, "/ready")

    async def call(client: httpx.AsyncClient, prompt: str) -> int:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        r = await client.post(proc.url + "/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return proc, call


def prompts(n: int, offset: int = 0) -> list[str]:
    return [
        f"Request {offset + i}: the operations team asked how the service handles load, "
        "and the answer was"
        for i in range(n)
    ]


async def measure(call, requests: int, concurrency: int) -> dict:
    async with httpx.AsyncClient(timeout=3600) as client:
        await call(client, "warm up")
        t0 = time.perf_counter()
        single = 0
        for p in prompts(requests):
            single += await call(client, p)
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(call(client, p) for p in prompts(concurrency, 100)))
        agg_s = time.perf_counter() - t0
    return {
        "single_tok_s": round(single / single_s, 2),
        "aggregate_tok_s": round(sum(counts) / agg_s, 2),
    }


def run_side(factory, requests: int, concurrency: int) -> dict:
    proc, call = factory()
    try:
        out = asyncio.run(measure(call, requests, concurrency))
        out["rss_mib"] = round(proc.rss() / 2**20)
        return out
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF model folder [TinyLlama-shaped, built once]")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--requests", type=int, default=3, help="single-stream requests")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 run")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.requests, args.concurrency = 8, 2, 4
    model = args.model or build("demo" if args.smoke else "tinyllama")
    t, c = args.tokens, args.concurrency

    ref = run_side(lambda: reference(model, args.dtype, args.threads, t), args.requests, c)
    ours = run_side(lambda: llmhost(model, args.dtype, args.threads, t, c), args.requests, c)
    result = {
        "model": str(model),
        "dtype": args.dtype,
        "threads": args.threads,
        "tokens": t,
        "concurrency": c,
        "reference": ref,
        "llmhost": ours,
        "single_ratio": round(ours["single_tok_s"] / ref["single_tok_s"], 3),
        "aggregate_ratio": round(ours["aggregate_tok_s"] / ref["aggregate_tok_s"], 3),
    }
    if not args.no_int8:
        int8 = run_side(
            lambda: llmhost(model, "float32", args.threads, t, c, "--quantization", "int8"),
            args.requests,
            c,
        )
        result["llmhost_int8"] = int8
        result["int8_rss_ratio"] = round(int8["rss_mib"] / ours["rss_mib"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
