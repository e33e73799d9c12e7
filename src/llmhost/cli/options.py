"""Option types and flag parsing shared by the command groups, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmhost.durations import parse_duration
from llmhost.errors import ConfigError

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Url = Annotated[str, typer.Option("--url", help="The server.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="LLMHOST_API_KEY", help="An API key.")
]
AdminApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="LLMHOST_API_KEY", help="An admin API key.")
]
KeyFile = Annotated[
    Path | None, typer.Option("--key-file", help="Key file (0600): raw, hex or base64.")
]
KeyCommand = Annotated[
    str | None, typer.Option("--key-command", help="Command that prints the key (KMS).")
]
AdminTokenFile = Annotated[
    Path | None,
    typer.Option(help="File with the router's admin token [LLMHOST_ROUTER_TOKEN]."),
]


def duration_flag(text: str, flag: str) -> float:
    """Seconds of a duration flag (`90d`, `12h`, `7 d`): a unit is required, so a bare number
    is never taken for seconds when days were meant."""
    try:
        return parse_duration("".join(text.split()), unit_required=True)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
