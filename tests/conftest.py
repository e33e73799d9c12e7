"""Shared fixtures: tiny real models built once per session and cached under the pytest cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from llmhost.config import Settings
from llmhost.store.demo import BuiltModel, build_model

IN_CI = os.environ.get("CI", "").lower() == "true"


def _builder_fingerprint() -> str:
    """Changes whenever the builder or its corpus changes, so stale cached models are rebuilt."""
    h = hashlib.sha256()
    for name in ("demo.py", "demo_corpus.txt"):
        h.update(resources.files("llmhost.store").joinpath(name).read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the real ~/.llmhost (config, audit log, models)."""
    monkeypatch.setenv("LLMHOST_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("LLMHOST_CONFIG", raising=False)


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest) -> BuiltModel:
    """The demo-shaped model in both formats (GGUF f32 and a Hugging Face folder)."""
    root = Path(request.config.cache.mkdir(f"llmhost-tiny-{_builder_fingerprint()}"))
    gguf = root / "llmhost-demo.gguf"
    if not (gguf.exists() and (root / "hf" / "model.safetensors").exists()):
        return build_model(root)
    return BuiltModel(gguf=gguf, hf_dir=root / "hf")


@pytest.fixture(scope="session")
def tiny_embedder(request: pytest.FixtureRequest) -> BuiltModel:
    """A tiny BERT sentence embedder in both formats (GGUF f32 and a sentence-transformers
    folder), from the same weights."""
    return _bert(request, "embedding")


@pytest.fixture(scope="session")
def tiny_reranker(request: pytest.FixtureRequest) -> BuiltModel:
    """A tiny BERT cross-encoder (one relevance logit) in both formats."""
    return _bert(request, "rerank")


def _bert(request: pytest.FixtureRequest, kind: str) -> BuiltModel:
    from llmhost.store.demo_bert import build_bert

    h = hashlib.sha256(resources.files("llmhost.store").joinpath("demo_bert.py").read_bytes())
    root = Path(request.config.cache.mkdir(f"llmhost-bert-{kind}-{h.hexdigest()[:12]}"))
    gguf = root / f"llmhost-bert-{kind}.gguf"
    if not (gguf.exists() and (root / "hf" / "model.safetensors").exists()):
        return build_bert(root, kind)  # type: ignore[arg-type]
    return BuiltModel(gguf=gguf, hf_dir=root / "hf")


def require(module: str):
    """Import an optional component; in CI a missing one fails loudly instead of skipping."""
    try:
        return __import__(module)
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"{module} is required in CI but missing: {exc}")
        pytest.skip(f"{module} not installed")


def require_exe(name: str, package: str) -> str:
    """A program from a Debian package; in CI a missing one fails loudly instead of skipping."""
    exe = shutil.which(name)
    if exe is None:
        if IN_CI:
            pytest.fail(f"{name} (Debian package {package}) is required in CI but missing")
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return exe


def open_settings(**overrides: Any) -> Settings:
    """A server's settings with authentication, the audit log and rate limits off, its state
    under the test's own LLMHOST_HOME: for tests about serving, not about the edge."""
    return Settings(**{"auth": False, "audit": False, "rate_limit_rps": 0, **overrides})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture()
def s3_server():
    """A local S3-compatible server (moto), and the environment that points boto3 at it."""
    require("boto3")
    moto_server = require("moto.server").server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    try:
        yield env
    finally:
        srv.stop()


@pytest.fixture()
def shm() -> Iterator[Path]:
    """A private folder in tmpfs (/dev/shm), where encrypted models may be decrypted."""
    from llmhost.store.in_memory import MEMORY_FS, filesystem_type

    base = Path("/dev/shm")
    if not base.is_dir() or filesystem_type(base) not in MEMORY_FS:
        pytest.skip("no tmpfs at /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="llmhost-test-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def start_engine():
    """Starts the engines a test builds (`await start_engine(engine)`) and closes each after it."""
    engines = []

    async def start(engine):
        await engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        await engine.close()
