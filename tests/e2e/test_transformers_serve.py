"""`llmhost serve --engine transformers` on the tiny HF folder, driven by the openai SDK: the
tokenizer's chat template, streaming, concurrent streams, and the benchmark's smoke run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.conftest import Server

require("torch")
require("transformers")
openai = require("openai")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("tf"),
        str(tiny_model.hf_dir),
        "--engine",
        "transformers",
        "--model-name",
        "tiny-hf",
        "--parallel",
        "4",
    )
    s.wait_ready(120)
    yield s
    assert s.stop() == 0


def test_chat_stream_and_models(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-hf"]
    chunks = list(
        client.chat.completions.create(
            model="tiny-hf",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model="tiny-hf",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        temperature=0,
    )
    assert text == full.choices[0].message.content
    # the prompt is the tokenizer's template: <s><|im_start|>user\nHello<|im_end|>\n<|im_start|>...
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens >= 8


def test_concurrent_streams(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")

    async def one(i: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model="tiny-hf",
            prompt=f"Request {i}",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        return reasons[-1], chunks[-1].usage.completion_tokens

    async def main() -> list[tuple[str, int]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 120)

    counts = asyncio.run(main())
    assert counts == [("length", 16)] * 8


def test_benchmark_smoke(tiny_model):
    script = ROOT / "benchmarks" / "transformers_vs_reference.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--model", str(tiny_model.hf_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("reference", "llmhost", "llmhost_int8"):
        assert result[side]["single_tok_s"] > 0 and result[side]["rss_mib"] > 0
    assert result["aggregate_ratio"] > 0
