"""The layer contract in pyproject.toml bites: the tree as it is keeps every contract, and a
throwaway copy of the package with one import pointing the wrong way breaks the contract that
forbids it (import-linter run on each, as the test script runs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
CONFIG = REPO / "pyproject.toml"
LINT = "import sys, importlinter.cli as cli; sys.exit(cli.lint_imports_command())"

LAYERS = "Layers point downward"
APART = "The middle layer's packages stay apart, but for the directions named"
NO_ENGINE = "The api layer sees no concrete engine"
NO_STORE = "The api layer leaves the store to the engines"
CONTRACTS = (LAYERS, APART, NO_ENGINE, NO_STORE)

# The engines modules the api layer may import; every other one is forbidden to it.
API_ENGINE_INTERFACES = {"base", "pool", "embedding", "chat_template", "toolcalls", "loading"}


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH and the working folder both name `src`, so the package analysed is the one
    # there and not an installed llmhost.
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", str(CONFIG)],
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_every_contract():
    run = lint_imports(SRC)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in run.stdout


# A module of the package, an import added to it, and the one contract that forbids it.
WRONG_WAY = {
    "engines->api, lazy": ("engines/base.py", "def f():\n    from llmhost.api import sse", LAYERS),
    "bottom->api": ("config.py", "from llmhost.api import errors", LAYERS),
    "ops->api": ("ops/plan.py", "from llmhost.api import app", LAYERS),
    "api->ops": ("api/routes.py", "from llmhost import ops", LAYERS),
    "store->engines": ("store/demo.py", "from llmhost.engines import chat_template", APART),
    "engines->store.registry": ("engines/pool.py", "from llmhost.store import registry", APART),
    "security->observability": ("security/auth.py", "import llmhost.observability.gpu", APART),
    "audit->security": ("audit/writer.py", "from llmhost.security import redact", APART),
    "api->engines.llamacpp": ("api/serving.py", "from llmhost.engines import llamacpp", NO_ENGINE),
    "api->engines.registry": ("api/serving.py", "from llmhost.engines import registry", NO_ENGINE),
    "api->transformers": ("api/serving.py", "import transformers", NO_ENGINE),
    "api->vllm": ("api/serving.py", "import vllm", NO_ENGINE),
    "api->store": ("api/app.py", "from llmhost.store import in_memory", NO_STORE),
}


@pytest.mark.parametrize(
    ("module", "line", "broken"), list(WRONG_WAY.values()), ids=list(WRONG_WAY)
)
def test_a_wrong_way_import_breaks_its_contract(tmp_path, module, line, broken):
    shutil.copytree(
        SRC / "llmhost", tmp_path / "llmhost", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "llmhost" / module
    target.write_text(f"{target.read_text()}\n\n{line}\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{broken} BROKEN" in run.stdout, run.stdout
    assert "Contracts: 3 kept, 1 broken." in run.stdout, run.stdout


def test_the_api_is_forbidden_every_engine_but_the_interfaces():
    contract = next(
        c for c in read_configuration(str(CONFIG))["contracts_options"] if c["name"] == NO_ENGINE
    )
    forbidden = {
        m.removeprefix("llmhost.engines.")
        for m in contract["forbidden_modules"]
        if m.startswith("llmhost.engines.")
    }
    engines = SRC / "llmhost" / "engines"
    modules = {p.stem for p in engines.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in engines.glob("*/__init__.py")}
    assert modules >= API_ENGINE_INTERFACES
    assert forbidden == modules - API_ENGINE_INTERFACES
    assert {"llama_cpp", "torch", "transformers", "vllm"} <= set(contract["forbidden_modules"])
