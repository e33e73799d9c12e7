"""scripts/install.sh against a stand-in Python that records its pip calls (nothing is built):
llama-cpp-python is compiled with the stated CMAKE_ARGS and never taken from pip's cache,
rebuilt when the CMAKE_ARGS differ from the ones recorded, left alone when they do not, and the
flags of the build in use are printed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

# Stands in for both the system python and .venv/bin/python. "Building" llama-cpp-python
# records the CMAKE_ARGS it saw; its system info then reports them.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_STATE/calls"
case "$1" in
  -) cat >/dev/null ;;
  -c)
    case "$2" in
      *llama_print_system_info*)
        [ -f "$FAKE_STATE/llama" ] || exit 1
        echo "CPU : built with $(cat "$FAKE_STATE/llama")" ;;
      *"import llama_cpp"*) [ -f "$FAKE_STATE/llama" ] || exit 1 ;;
    esac ;;
  -m)
    case " $* " in
      *" llama-cpp-python>="*) printf '%s' "$CMAKE_ARGS" > "$FAKE_STATE/llama" ;;
    esac ;;
esac
exit 0
"""


@pytest.fixture()
def tree(tmp_path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    bin_dir = tmp_path / "bin"
    venv_bin = repo / ".venv" / "bin"
    for folder in (bin_dir, venv_bin):
        folder.mkdir(parents=True)
        (folder / "python").write_text(FAKE_PYTHON)
        (folder / "python").chmod(0o755)
    for tool in ("g++", "cmake"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    (venv_bin / "llmhost").write_text("#!/bin/sh\necho 'llmhost 0.0.0'\n")
    (venv_bin / "llmhost").chmod(0o755)
    (tmp_path / "state").mkdir()
    return repo


def install(repo: Path, cmake_args: str | None = None) -> tuple[str, list[str]]:
    state = repo.parent / "state"
    (state / "calls").unlink(missing_ok=True)
    env = {
        k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLMHOST_EXTRAS", "PYTHON")
    }
    env.update(
        PATH=f"{repo.parent / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHON=str(repo.parent / "bin" / "python"),
        FAKE_STATE=str(state),
    )
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    p = subprocess.run(
        ["bash", str(repo / "scripts" / "install.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    calls = (state / "calls").read_text().splitlines()
    return p.stderr, [c for c in calls if c.startswith("-m pip") and "llama-cpp-python>=" in c]


def test_llama_cpp_is_built_with_the_stated_flags_and_rebuilt_when_they_change(tree):
    stamp = tree / ".venv" / ".llmhost-llama-cmake-args"
    out, builds = install(tree)
    assert builds == [
        "-m pip install -q --no-cache-dir --no-binary llama-cpp-python llama-cpp-python>=0.3.16"
    ]
    assert stamp.read_text().strip() == DEFAULT_ARGS
    assert f"llama.cpp build in use: CPU : built with {DEFAULT_ARGS}" in out

    out, builds = install(tree)  # same flags: nothing is rebuilt
    assert builds == [] and "already built" in out

    cuda = f"{DEFAULT_ARGS} -DGGML_CUDA=ON"
    out, builds = install(tree, cuda)
    assert len(builds) == 1 and "--force-reinstall" in builds[0] and "--no-cache-dir" in builds[0]
    assert "--no-binary llama-cpp-python" in builds[0]
    assert stamp.read_text().strip() == cuda
    assert f"built with {cuda}" in out
    assert install(tree, cuda)[1] == []

    # a build this script did not record (an older install): its flags are unknown, rebuild
    stamp.unlink()
    out, builds = install(tree)
    assert len(builds) == 1 and "unrecorded flags" in out
    assert stamp.read_text().strip() == DEFAULT_ARGS
