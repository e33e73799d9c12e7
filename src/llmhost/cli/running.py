"""`llmhost models ps|load|unload`: the models of a running server (like `ollama ps`), through
its admin API (an admin API key: --api-key or LLMHOST_API_KEY)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llmhost.cli.options import AdminApiKey, Url
from llmhost.config import DEFAULT_PORT
from llmhost.errors import LlmhostError

models_app = typer.Typer(
    help="Models of a running server: list, load, unload.", no_args_is_help=True
)

SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"


def _call(method: str, url: str, path: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=3600)
    except httpx.HTTPError as exc:
        raise LlmhostError(f"cannot reach {url}: {exc}") from exc
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400:
        message = (body.get("error") or {}).get("message") or r.text[:200]
        raise LlmhostError(f"{r.status_code} from {url}: {message}")
    return body


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / (1 << 30):.2f} GiB"


def _until(ts: float | None) -> str:
    if ts is None:
        return "-"
    left = ts - time.time()
    return "now" if left <= 0 else f"in {left:.0f}s" if left < 120 else f"in {left / 60:.0f} min"


@models_app.command()
def ps(
    url: Url = SERVER,
    api_key: AdminApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="The server's JSON.")] = False,
) -> None:
    """Every model with its state, memory, requests in flight and when it unloads."""
    body = _call("GET", url, "/v1/admin/models", api_key)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    table = Table("model", "kind", "state", "memory", "in flight", "unloads", "error")
    for m in body["data"]:
        unloads = "pinned" if m["pinned"] else _until(m["expires_at"])
        table.add_row(
            m["id"],
            m["kind"],
            m["state"],
            _memory(m),
            str(m["in_flight"]),
            unloads,
            (m["error"] or "")[:60],
        )
    console = Console()
    console.print(table)
    console.print(
        f"memory: {_gib(body['memory_used_bytes'])} of {_gib(body['memory_budget_bytes'])}",
        highlight=False,
    )
    used = body.get("gpu_memory_used_bytes") or {}
    for gpu, budget in (body.get("gpu_memory_budget_bytes") or {}).items():
        console.print(f"GPU {gpu}: {_gib(used.get(gpu, 0))} of {_gib(budget)}", highlight=False)


def _memory(m: dict) -> str:
    """Host memory, then each GPU's: "1.2 GiB", "GPU 0: 14.0 GiB"."""
    parts = [_gib(m["memory_bytes"])] if m["memory_bytes"] or not m.get("gpu_memory_bytes") else []
    parts += [f"GPU {i}: {_gib(n)}" for i, n in (m.get("gpu_memory_bytes") or {}).items()]
    return ", ".join(parts)


@models_app.command()
def load(model: str = typer.Argument(...), url: Url = SERVER, api_key: AdminApiKey = None) -> None:
    """Load a model now (waits until it is loaded)."""
    m = _call("POST", url, f"/v1/admin/models/{model}/load", api_key)
    typer.echo(f"{m['id']}: {m['state']}")


@models_app.command()
def unload(
    model: str = typer.Argument(...), url: Url = SERVER, api_key: AdminApiKey = None
) -> None:
    """Unload a model now (refused while it has requests in flight)."""
    m = _call("POST", url, f"/v1/admin/models/{model}/unload", api_key)
    typer.echo(f"{m['id']}: {m['state']}")
