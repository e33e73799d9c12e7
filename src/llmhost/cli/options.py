"""Option types and flag parsing shared by the command groups, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from llmhost.config import Settings
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


def setting(name: str, *flags: str, more: str = "") -> Any:
    """The option of setting `name`: its help is the field's description (then `more`, what
    only the command line does) and the default it shows is the field's, so neither drifts
    from `Settings`. The option itself defaults to None, so a flag not given leaves the
    environment and config.toml their say."""
    field = Settings.model_fields[name]
    help_text = " ".join(t for t in (field.description, more) if t)
    return typer.Option(*flags, help=help_text, show_default=shown_default(field, flags))


def shown_default(field: FieldInfo, flags: tuple[str, ...] = ()) -> str | bool:
    """What `--help` shows as a field's default: a flag pair shows the flag that is on, a lone
    switch and an empty or computed default show nothing (the description says it)."""
    default = field.default
    if field.default_factory is not None or default in (None, "", []):
        return False
    if isinstance(default, bool):
        pair = [f for flag in flags for f in flag.split("/")]
        return pair[0 if default else 1] if len(pair) == 2 else False
    return str(default)
