"""What the side-by-side benchmarks share: llama.cpp's own llama-server, built once into
$LLMHOST_BENCH_CACHE (default ~/.cache/llmhost-bench) from the llama.cpp sources vendored in
the installed llama-cpp-python's sdist, with the portable flags the engine build uses (the
native build crashes on CPUs with AMX), and starting, waiting for and stopping servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

CACHE = Path(os.environ.get("LLMHOST_BENCH_CACHE", Path.home() / ".cache/llmhost-bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary() -> Path:
    ver = version("llama-cpp-python")
    binary = CACHE / f"llama.cpp-{ver}" / "bin" / "llama-server"
    if binary.exists():
        return binary
    print(f"[bench] building llama-server from llama-cpp-python {ver} (minutes)", file=sys.stderr)
    src = CACHE / f"src-{ver}"
    if not (src / "vendor/llama.cpp").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    f"llama-cpp-python=={ver}",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            (tarball,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            src.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "xzf", tarball, "-C", src, "--strip-components=1"], check=True)
    build = src / "build"
    # Same portable flags as vs_llama_server.sh and the engine build.
    subprocess.run(
        [
            "cmake",
            "-S",
            src / "vendor/llama.cpp",
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=OFF",
            "-DGGML_AVX2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
        ],
        check=True,
        stdout=sys.stderr,
    )
    subprocess.run(
        [
            "cmake",
            "--build",
            build,
            "--target",
            "llama-server",
            "llama-bench",
            "-j",
            str(os.cpu_count() or 2),
        ],
        check=True,
        stdout=sys.stderr,
    )
    binary.parent.mkdir(parents=True, exist_ok=True)
    for name in ("llama-server", "llama-bench"):
        shutil.copy2(build / "bin" / name, binary.parent / name)
    return binary


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout}s: {url}")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def start(cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None):
    """Start `cmd` with its output in `log`; returns the process once `ready_url` answers 200."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(ready_url, proc, log)
    except Exception:
        stop([proc])
        raise
    return proc
