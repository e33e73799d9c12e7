"""The CLI's shape: every command a module-level function of its command-group module (so
tests can import it), every group a module-level Typer, none of its functions over 80 lines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import typer

import llmhost.cli
from llmhost.cli.main import app

CLI_DIR = Path(llmhost.cli.__file__).parent
MAX_LINES = 80


def commands(t: typer.Typer, path: str = ""):
    for info in t.registered_commands:
        yield f"{path} {info.name or info.callback.__name__}".strip(), info.callback
    for group in t.registered_groups:
        yield from commands(group.typer_instance, f"{path} {group.name}".strip())


def test_every_command_is_a_module_level_function():
    found = list(commands(app))
    assert len(found) >= 40
    for name, callback in found:
        module = importlib.import_module(callback.__module__)
        assert module.__name__.startswith("llmhost.cli."), name
        assert getattr(module, callback.__name__) is callback, name
        assert "<locals>" not in callback.__qualname__, name


def test_every_group_is_a_module_level_typer():
    for group in app.registered_groups:
        t = group.typer_instance
        module = importlib.import_module(t.registered_commands[0].callback.__module__)
        assert t in vars(module).values(), group.name


def test_no_cli_function_is_longer_than_80_lines():
    long = []
    for path in sorted(CLI_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long
