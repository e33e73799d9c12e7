"""`llmhost usage`: requests and tokens per key, user, model or UTC day, from a running
server's admin API (an admin API key: --api-key or LLMHOST_API_KEY)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from llmhost.cli.options import AdminApiKey, AsJson, Url
from llmhost.cli.running import SERVER
from llmhost.errors import ConfigError, LlmhostError

GROUPS = ("key", "user", "model", "day")


def _fetch(url: str, api_key: str | None, params: dict[str, str]) -> tuple[int, str]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(
            url.rstrip("/") + "/v1/admin/usage", params=params, headers=headers, timeout=60
        )
    except httpx.HTTPError as exc:
        raise LlmhostError(f"cannot reach {url}: {exc}") from exc
    return r.status_code, r.text


def _error(status: int, text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def usage(
    since: Annotated[
        str | None, typer.Option(help="First UTC day, YYYY-MM-DD [30 days before --until].")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last UTC day, included [today].")] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", "-g", help="key, user, model or day.")
    ] = "day",
    url: Url = SERVER,
    api_key: AdminApiKey = None,
    as_json: AsJson = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """Requests and tokens per key, user, model or day (at most 366 days at a time)."""
    if group_by not in GROUPS:
        raise ConfigError(f"--group-by is one of {', '.join(GROUPS)}")
    if as_json and as_csv:
        raise ConfigError("--json and --csv: pick one")
    fmt: Literal["json", "csv"] = "csv" if as_csv else "json"
    params = {"group_by": group_by, "format": fmt}
    params.update({k: v for k, v in (("since", since), ("until", until)) if v is not None})
    status, text = _fetch(url, api_key, params)
    if status >= 400:
        raise LlmhostError(f"{status} from {url}: {_error(status, text)}")
    if as_csv:
        typer.echo(text, nl=False)
        return
    body = json.loads(text)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    table = Table(group_by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "TOTAL TOKENS")
    for row in body["data"]:
        table.add_row(
            str(row[group_by]) or "-",
            str(row["requests"]),
            str(row["prompt_tokens"]),
            str(row["completion_tokens"]),
            str(row["total_tokens"]),
        )
    console = Console()
    console.print(table)
    console.print(f"{body['since']} to {body['until']} (UTC days)", highlight=False)
