"""vLLM behind llmhost: llmhost launches `vllm serve` as a child process on a private loopback
port (tensor and pipeline parallelism, Ray for several nodes, quantization, context length,
GPU memory share from the settings), waits for its health, restarts it with backoff if it
dies, and serves through the openai engine, so keys, limits, audit and metrics apply.

A two-node set-up (Ray): on the head node `ray start --head --port 6379`, on the other
`ray start --address HEAD:6379`, then on the head
`llmhost serve meta-llama/Llama-2-70b-hf --engine vllm --tensor-parallel 8
--pipeline-parallel 2 --distributed-backend ray`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from llmhost.engines.openai_upstream import OpenAIUpstreamEngine
from llmhost.errors import ModelLoadError
from llmhost.types import EngineHealth

if TYPE_CHECKING:
    from llmhost.config import Settings

log = logging.getLogger("llmhost.engines.vllm")


# llmhost's tool-call format names -> vLLM's --tool-call-parser names.
VLLM_TOOL_PARSERS = {
    "hermes": "hermes",
    "llama3": "llama3_json",
    "mistral": "mistral",
    "deepseek": "deepseek_v3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def vllm_command(settings: Settings, port: int, api_key: str, served_name: str) -> list[str]:
    """The `vllm serve` command line these settings ask for."""
    if not settings.model:
        raise ModelLoadError("the vllm engine needs a model (a Hugging Face id or a folder)")
    cmd = [
        *shlex.split(settings.vllm_command),
        "serve",
        settings.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        api_key,
        "--served-model-name",
        served_name,
        "--tensor-parallel-size",
        str(settings.tensor_parallel),
        "--pipeline-parallel-size",
        str(settings.pipeline_parallel),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
    ]
    if settings.distributed_backend:
        cmd += ["--distributed-executor-backend", settings.distributed_backend]
    if settings.quantization:
        cmd += ["--quantization", settings.quantization]
    if settings.ctx_size:
        cmd += ["--max-model-len", str(settings.ctx_size)]
    extra = shlex.split(settings.vllm_args)
    # vLLM parses tool calls for tool_choice "auto" only with a parser named at start;
    # "required" and named functions work without one (it constrains those itself).
    parser = VLLM_TOOL_PARSERS.get(settings.tool_parser or "")
    if parser and "--tool-call-parser" not in extra:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    return cmd + extra


class VllmEngine(OpenAIUpstreamEngine):
    name = "vllm"

    def __init__(
        self, settings: Settings, *, start_timeout: float = 1800.0, max_backoff: float = 30.0
    ):
        self.settings = settings
        self.port = free_port()
        key = secrets.token_urlsafe(24)  # only llmhost talks to the child
        served = settings.model_name or Path(settings.model or "model").name
        self.command = vllm_command(settings, self.port, key, served)
        super().__init__(
            f"http://127.0.0.1:{self.port}",
            model=served,
            served_name=served,
            api_key=key,
            timeout=settings.upstream_timeout,
        )
        self.start_timeout = start_timeout
        self.max_backoff = max_backoff
        self.log_path = settings.home / "vllm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngine:
        return cls(settings)

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting: %s", shlex.join(self.command))
        self.proc = subprocess.Popen(
            self.command,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers die with it when we signal the group
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
        )

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise ModelLoadError(f"vllm exited with {code} while starting:\n{self._tail()}")
                try:
                    if (await c.get(self.base_url + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise ModelLoadError(f"vllm was not healthy within {timeout:.0f} s:\n{self._tail()}")

    async def start(self) -> None:
        self._spawn()
        try:
            await self._wait_healthy(self.start_timeout)
            await super().start()
        except BaseException:
            self._kill()
            raise
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._closing:
            await asyncio.sleep(0.5)
            if self.proc is None or self.proc.poll() is None:
                continue
            code = self.proc.returncode
            self._healthy, self._detail = False, f"vllm exited with {code}; restarting"
            log.error("vllm exited with %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            if self._closing:
                return
            self.restarts += 1
            started = time.monotonic()
            self._spawn()
            try:
                await self._wait_healthy(self.start_timeout)
            except ModelLoadError as exc:
                log.error("vllm restart failed: %s", exc.message)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._healthy, self._detail = True, ""
            log.info("vllm is back after %.1f s", time.monotonic() - started)
            backoff = 1.0

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await super().close()
        await asyncio.to_thread(self._kill)

    def health(self) -> EngineHealth:
        h = super().health()
        h.stats["restarts"] = self.restarts
        return h
