"""The vllm engine: the `vllm serve` command line built from the settings (and from a saved
plan), supervision of a stand-in child (health wait, restart after kill -9, clean stop, a
child that dies at start), and on a CUDA host a real vLLM on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmhost.config import Settings
from llmhost.engines.vllm import vllm_command
from tests.e2e.conftest import Server, free_port

STANDIN = f"{sys.executable} {Path(__file__).parents[1] / 'vllm_standin.py'}"


def test_command_line(tmp_path):
    s = Settings(
        home=tmp_path,
        model="meta-llama/Llama-2-70b-hf",
        tensor_parallel=8,
        pipeline_parallel=2,
        distributed_backend="ray",
        quantization="awq",
        ctx_size=8192,
        gpu_memory_utilization=0.85,
        vllm_args="--enforce-eager",
    )
    cmd = vllm_command(s, 9000, "k", "llama70")
    assert cmd == [
        "vllm",
        "serve",
        "meta-llama/Llama-2-70b-hf",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        "--api-key",
        "k",
        "--served-model-name",
        "llama70",
        "--tensor-parallel-size",
        "8",
        "--pipeline-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.85",
        "--distributed-executor-backend",
        "ray",
        "--quantization",
        "awq",
        "--max-model-len",
        "8192",
        "--enforce-eager",
    ]
    plain = vllm_command(Settings(home=tmp_path, model="m"), 1, "k", "m")
    assert "--distributed-executor-backend" not in plain and "--max-model-len" not in plain
    assert "--enable-auto-tool-choice" not in plain


def test_tool_parser_starts_vllm_with_its_parser(tmp_path):
    cmd = vllm_command(Settings(home=tmp_path, model="m", tool_parser="llama3"), 1, "k", "m")
    assert cmd[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    # a parser given in vllm_args wins
    own = Settings(
        home=tmp_path, model="m", tool_parser="hermes", vllm_args="--tool-call-parser pythonic"
    )
    cmd = vllm_command(own, 1, "k", "m")
    assert cmd.count("--tool-call-parser") == 1 and cmd[-1] == "pythonic"


def serve_vllm(tmp_path, *extra, env=None):
    srv = Server.__new__(Server)
    srv.port = free_port()
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv.verify = True
    srv.log = tmp_path / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "llmhost",
        "serve",
        "org/some-model",
        "--engine",
        "vllm",
        "--port",
        str(srv.port),
        "--no-auth",
        *extra,
    ]
    srv.proc = subprocess.Popen(
        cmd,
        stdout=srv.log.open("wb"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "LLMHOST_HOME": str(tmp_path),
            "LLMHOST_VLLM_COMMAND": STANDIN,
            **(env or {}),
        },
    )
    return srv


def test_supervised_child_restarts_and_stops(tmp_path):
    record = tmp_path / "standin.jsonl"
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "ctx": 4096,
                "gpus": [
                    {"gpu": "A100 80GB", "gpus_needed": 2},
                    {"gpu": "RTX 4090", "gpus_needed": 8},
                ],
            }
        )
    )
    srv = serve_vllm(
        tmp_path,
        "--from-plan",
        str(plan),
        "--plan-gpu",
        "a100",
        env={"STANDIN_RECORD": str(record)},
    )
    try:
        ready = srv.wait_ready(timeout=60)
        assert ready["engine"] == "vllm" and ready["model"] == "some-model"
        first = json.loads(record.read_text().splitlines()[0])
        argv = first["argv"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"  # from the plan
        assert argv[argv.index("--max-model-len") + 1] == "4096"
        r = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # out, then back with a new child
            ready = httpx.get(srv.url + "/ready", timeout=5)
            if ready.status_code == 200 and ready.json()["stats"].get("restarts") == 1:
                break
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        second = json.loads(record.read_text().splitlines()[-1])
        assert second["pid"] != first["pid"]
        r = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 200
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-2000:]
    for rec in map(json.loads, record.read_text().splitlines()):
        with pytest.raises(ProcessLookupError):
            os.kill(rec["pid"], 0)  # no child left behind


def test_child_dying_at_start_fails_the_server(tmp_path):
    srv = serve_vllm(tmp_path, env={"STANDIN_FAIL": "1"})
    assert srv.proc.wait(timeout=60) != 0
    out = srv.log.read_text()
    assert "vllm exited with 1 while starting" in out and "no CUDA device" in out


@pytest.mark.gpu
def test_real_vllm_on_the_tiny_model(tiny_model, tmp_path):
    pytest.importorskip("vllm")
    srv = Server(
        tmp_path,
        str(tiny_model.hf_dir),
        "--engine",
        "vllm",
        "--ctx-size",
        "256",
        "--gpu-memory-utilization",
        "0.3",
    )
    try:
        srv.wait_ready(timeout=600)
        r = httpx.post(
            srv.url + "/v1/completions",
            timeout=120,
            json={"prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        srv.stop()
