"""Several models in one server, side by side with llama.cpp's own llama-server:

- embeddings: inputs/s with 32 concurrent single-input requests and with one 32-input request,
  llmhost's llama.cpp embedding engine against `llama-server --embeddings` on the same GGUF
  (a BERT-base-shaped model, random weights); and the transformers engine against the
  deployment guide's style of code (one forward pass per request), in-process;
- cold switch: from a request for a model that is not loaded to its first token, llmhost
  loading on demand against llama-server's router mode (`--models-dir`, autoload), on the
  same GGUF files, with the page cache warm (the files read just before) and cold (their
  cached pages dropped with POSIX_FADV_DONTNEED);
- isolation: TTFT p50 of requests to a loaded model while another model loads, against the
  same requests with nothing loading.

    PYTHONPATH=src .venv/bin/python benchmarks/model_pool.py            # the full run
    PYTHONPATH=src .venv/bin/python benchmarks/model_pool.py --smoke    # tiny models, CI

Prints one JSON line last: the figures, the ratios and which targets were met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
from prefix_cache import tinyllama
from servers import CACHE, free_port, llama_server_binary, start, stop

from llmhost.ops.bench import make_prompt
from llmhost.store.demo import ensure_demo_model
from llmhost.store.demo_bert import BERT_BASE, TINY_BERT, build_bert

LOGS = CACHE / "pool-logs"


def embedder(smoke: bool) -> tuple[Path, Path]:
    shape = TINY_BERT if smoke else BERT_BASE
    root = CACHE / f"bert-{'tiny' if smoke else 'base'}-embedding"
    built = root / "llmhost-bert-embedding.gguf"
    if not (built.exists() and (root / "hf" / "model.safetensors").exists()):
        shutil.rmtree(root, ignore_errors=True)
        build_bert(root, "embedding", shape)
    return built, root / "hf"


def llmhost_cmd(args, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "llmhost", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--threads", str(args.threads), "--no-auth", "--log-level", "warning", *extra),
    ]


def llmhost_env(home: Path) -> dict[str, str]:
    return {**os.environ, "LLMHOST_HOME": str(home), "LLMHOST_RATE_LIMIT_RPS": "0"}


# --- embeddings --------------------------------------------------------------------------


async def embed_rate(url: str, model: str, texts: list[str], rounds: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as c:

        async def one(inp) -> None:
            r = await c.post(url + "/v1/embeddings", json={"model": model, "input": inp})
            r.raise_for_status()

        await one(texts[:2])  # warm up
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one(t) for t in texts))
        single = len(texts) * rounds / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(rounds):
            await one(texts)
        batched = len(texts) * rounds / (time.perf_counter() - t0)
    return {"concurrent_single_inputs_s": round(single, 1), "one_batch_inputs_s": round(batched, 1)}


async def embeddings(args, gguf: Path, hf: Path) -> dict:
    texts = [make_prompt(args.embed_words, f"e{i}") for i in range(32)]
    home = CACHE / "pool-home"
    (home).mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[models.embed]\nsource = "{gguf}"\nkind = "embedding"\nparallel = 32\nbatch_size = 8192\n'
    )
    port = free_port()
    lh = start(
        llmhost_cmd(args, port),
        f"http://127.0.0.1:{port}/ready",
        LOGS / "llmhost-embed.log",
        llmhost_env(home),
    )
    out: dict = {}
    procs = [lh]
    try:
        lh_url = f"http://127.0.0.1:{port}"
        if not args.no_llama_server:
            lport = free_port()
            cmd = [str(args.llama_server or llama_server_binary()), "-m", str(gguf)]
            cmd += ["--embeddings", "-t", str(args.threads), "-tb", str(args.threads)]
            cmd += ["-np", "32", "-c", str(32 * 512), "-b", "8192", "-ub", "512"]
            cmd += ["--host", "127.0.0.1", "--port", str(lport)]
            ls = start(cmd, f"http://127.0.0.1:{lport}/health", LOGS / "llama-server-embed.log")
            procs.append(ls)
        for _ in range(args.rounds):  # alternate, so drift hits both
            out.setdefault("llmhost", []).append(
                await embed_rate(lh_url, "embed", texts, args.embed_rounds)
            )
            if not args.no_llama_server:
                out.setdefault("llama_server", []).append(
                    await embed_rate(f"http://127.0.0.1:{lport}", "embed", texts, args.embed_rounds)
                )
    finally:
        stop(procs)
    report = {side: _median(runs) for side, runs in out.items()}
    if "llama_server" in report:
        report["ratio_vs_llama_server"] = {
            k: round(report["llmhost"][k] / report["llama_server"][k], 3) for k in report["llmhost"]
        }
    report["transformers"] = await transformers_vs_naive(hf, texts, args)
    return report


def _median(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


async def transformers_vs_naive(hf: Path, texts: list[str], args) -> dict:
    """The transformers engine with 32 concurrent requests against one forward per request."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from llmhost.engines.transformers_embed import TransformersEmbeddingEngine

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModel.from_pretrained(hf).eval()
    t0 = time.perf_counter()
    for _ in range(args.embed_rounds):
        for t in texts:  # the guide's style: each request alone
            with torch.inference_mode():
                batch = tok(t, return_tensors="pt")
                model(**batch).last_hidden_state.mean(1)
    naive = len(texts) * args.embed_rounds / (time.perf_counter() - t0)
    engine = TransformersEmbeddingEngine(hf, threads=args.threads, parallel=32, batch_size=8192)
    await engine.start()
    try:
        ids = [engine.tokenize(t) for t in texts]
        await engine.embed(ids[:2])
        t0 = time.perf_counter()
        for _ in range(args.embed_rounds):
            await asyncio.gather(*(engine.embed([i]) for i in ids))
        batched = len(texts) * args.embed_rounds / (time.perf_counter() - t0)
    finally:
        await engine.close()
    return {
        "naive_inputs_s": round(naive, 1),
        "engine_inputs_s": round(batched, 1),
        "ratio": round(batched / naive, 3),
    }


# --- cold switch and isolation ----------------------------------------------------------------


async def ttft(
    c: httpx.AsyncClient, url: str, model: str, words: int = 8, **extra: object
) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": make_prompt(words, uuid.uuid4().hex)}],
        "max_tokens": 2,
        "stream": True,
        # a random model ends its turn first about one time in a hundred: no token to time
        # (llama-server takes the same field)
        "ignore_eos": True,
        **extra,
    }
    t0 = time.perf_counter()
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"{url}: no token from {model}")


def page_cache(files: list[str], warm: bool) -> None:
    """Read the files through (warm) or ask the kernel to drop their cached pages (cold:
    POSIX_FADV_DONTNEED, which needs no privileges and touches nothing else)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if warm:
                while os.read(fd, 1 << 24):
                    pass
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def _switch_llmhost(args, files: list[str], names: list[str], cache: str) -> list[float]:
    port = free_port()
    home = CACHE / "pool-home-switch"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").unlink(missing_ok=True)
    lh = start(
        llmhost_cmd(args, port, *files, "--parallel", "1", "--ctx-size", "2048"),
        f"http://127.0.0.1:{port}/ready",
        LOGS / "llmhost-switch.log",
        llmhost_env(home),
    )
    try:
        page_cache(files, cache == "warm")
        async with httpx.AsyncClient(timeout=600) as c:
            return [await ttft(c, f"http://127.0.0.1:{port}", n) for n in names]
    finally:
        stop([lh])


async def _switch_llama_server(args, folder: Path, names: list[str], cache: str) -> list[float]:
    lport = free_port()
    cmd = [str(args.llama_server or llama_server_binary()), "--models-dir", str(folder)]
    cmd += ["--models-max", "2", "-t", str(args.threads), "-c", "2048", "-np", "1"]
    cmd += ["--host", "127.0.0.1", "--port", str(lport)]
    ls = start(cmd, f"http://127.0.0.1:{lport}/health", LOGS / "llama-server-router.log")
    try:
        page_cache([str(folder / f"{n}.gguf") for n in names], cache == "warm")
        async with httpx.AsyncClient(timeout=600) as c:
            return [await ttft(c, f"http://127.0.0.1:{lport}", n) for n in names]
    finally:
        stop([ls])


async def cold_switch(args, folder: Path) -> dict:
    """Each server with two models, neither loaded; time a request to one, then to the other
    (which joins the first), as many times as --rounds, with the files in the page cache
    (warm) and not (cold). Which server goes first alternates from round to round."""
    names = sorted(p.name.removesuffix(".gguf") for p in folder.glob("*.gguf"))
    files = [str(folder / f"{n}.gguf") for n in names]
    report: dict = {}
    for cache in ("warm", "cold"):
        out: dict[str, list[float]] = {"llmhost": [], "llama_server": []}
        for i in range(args.rounds):
            order = ["llmhost", "llama_server"][:: 1 if i % 2 == 0 else -1]
            for who in order:
                if who == "llmhost":
                    out[who] += await _switch_llmhost(args, files, names, cache)
                elif not args.no_llama_server:
                    out[who] += await _switch_llama_server(args, folder, names, cache)
        part = {k: round(statistics.median(v), 3) for k, v in out.items() if v}
        if "llama_server" in part:
            part["ratio"] = round(part["llmhost"] / part["llama_server"], 3)
        report[f"page_cache_{cache}"] = part
    return report


async def isolation(args, folder: Path) -> dict:
    """TTFT of a loaded model, idle and while the other model loads again and again."""
    names = sorted(p.name.removesuffix(".gguf") for p in folder.glob("*.gguf"))
    port = free_port()
    home = CACHE / "pool-home-isolation"
    home.mkdir(parents=True, exist_ok=True)
    key_env = llmhost_env(home)
    files = [str(folder / f"{n}.gguf") for n in names]
    lh = start(
        llmhost_cmd(args, port, *files, "--parallel", "2", "--ctx-size", "2048"),
        f"http://127.0.0.1:{port}/ready",
        LOGS / "llmhost-isolation.log",
        key_env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=600) as c:
            await ttft(c, url, names[0])
            idle = [await ttft(c, url, names[0]) for _ in range(args.isolation_requests)]
            loading = True

            async def churn() -> int:
                n = 0
                while loading:  # load the other model; keep_alive 0 unloads it again
                    await ttft(c, url, names[1], keep_alive=0)
                    n += 1
                return n

            async def measure() -> list[float]:
                return [await ttft(c, url, names[0]) for _ in range(args.isolation_requests)]

            task = asyncio.create_task(churn())
            busy = await measure()
            loading = False
            loads = await task
    finally:
        stop([lh])
    p50_idle, p50_busy = statistics.median(idle), statistics.median(busy)
    return {
        "ttft_p50_idle_s": round(p50_idle, 4),
        "ttft_p50_while_loading_s": round(p50_busy, 4),
        "ratio": round(p50_busy / p50_idle, 3),
        "loads_meanwhile": loads,
    }


def switch_models(smoke: bool) -> Path:
    folder = CACHE / ("switch-tiny" if smoke else "switch-tinyllama")
    folder.mkdir(parents=True, exist_ok=True)
    source = ensure_demo_model(CACHE) if smoke else tinyllama()
    for name in ("model-a", "model-b"):
        target = folder / f"{name}.gguf"
        if not target.exists():
            shutil.copy(source, target)
    return folder


async def run(args) -> dict:
    report: dict = {"config": vars(args)}
    if args.only in (None, "embeddings"):
        gguf, hf = embedder(args.smoke)
        report["embeddings"] = await embeddings(args, gguf, hf)
    folder = switch_models(args.smoke)
    if args.only in (None, "switch"):
        report["cold_switch"] = await cold_switch(args, folder)
    if args.only in (None, "isolation"):
        report["isolation"] = await isolation(args, folder)
    if args.only:
        return report
    emb = report["embeddings"].get("ratio_vs_llama_server")
    report["targets"] = {
        "embeddings_ge_1x_llama_server": None if emb is None else min(emb.values()) >= 1.0,
        "cold_switch_le_1x_llama_server": (
            None
            if args.no_llama_server
            else all(part["ratio"] <= 1.0 for part in report["cold_switch"].values())
        ),
        "isolation_le_1.2x": report["isolation"]["ratio"] <= 1.2,
    }
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, short runs")
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (default: build)")
    ap.add_argument("--no-llama-server", action="store_true", help="llmhost only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--embed-rounds", type=int, default=3, help="batches of 32 inputs a run")
    ap.add_argument("--embed-words", type=int, default=48, help="words per embedded input")
    ap.add_argument("--isolation-requests", type=int, default=20)
    ap.add_argument("--only", choices=["embeddings", "switch", "isolation"], help="one part")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.embed_rounds, args.isolation_requests = 1, 1, 4
    LOGS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = asyncio.run(run(args))
    report["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
