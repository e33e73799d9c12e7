"""The llama.cpp sources vendored in the llama-cpp-python sdist of the installed version, fetched
once into the benchmark cache (the layout benchmarks/vs_llama_server.sh uses) and reused."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


class SourcesUnavailable(RuntimeError):
    """The sdist could not be fetched or unpacked (no network, no package index)."""


def bench_cache() -> Path:
    """$LLMHOST_BENCH_CACHE, or ~/.cache/llmhost-bench, as in benchmarks/vs_llama_server.sh."""
    return Path(os.environ.get("LLMHOST_BENCH_CACHE") or Path.home() / ".cache" / "llmhost-bench")


def llama_cpp_python_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError as exc:
        raise SourcesUnavailable("llama-cpp-python is not installed") from exc


def llama_cpp_sources(timeout_s: float = 600) -> Path:
    """The unpacked sdist, `<cache>/src-<version>`: downloaded with pip and unpacked the first
    time, then reused. The llama.cpp tree is its `vendor/llama.cpp`."""
    ver = llama_cpp_python_version()
    cache = bench_cache()
    src = cache / f"src-{ver}"
    if (src / "vendor" / "llama.cpp").is_dir():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
        cmd += [f"llama-cpp-python=={ver}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourcesUnavailable(f"pip download failed: {exc}") from exc
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise SourcesUnavailable(f"pip download failed: {done.stderr.strip()[-2000:]}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="data")
        (top,) = unpacked.iterdir()  # the sdist's one top folder, as tar --strip-components=1
        if not src.exists():  # another process may have finished first
            top.rename(src)
    return src


def llama_cpp_templates(src: Path) -> list[Path]:
    """The chat templates llama.cpp tests against, one .jinja file per model."""
    return sorted((src / "vendor" / "llama.cpp" / "models" / "templates").glob("*.jinja"))
