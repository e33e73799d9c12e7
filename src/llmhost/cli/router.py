"""`llmhost router`: one address in front of several llmhost replicas or other servers."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from llmhost.config import public_url as check_public_url
from llmhost.errors import ConfigError


def router(
    upstream: list[str] = typer.Option(
        ..., "--upstream", "-u", help="URL or NAME=URL of an upstream (repeat)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535),
    admin_token_file: Path | None = typer.Option(
        None,
        help="File holding the token for PUT /router/weights and GET /router/status "
        "[LLMHOST_ROUTER_TOKEN].",
    ),
    retries: int = typer.Option(2, min=0, max=10, help="Other upstreams tried before failing."),
    check_every: float = typer.Option(1.0, min=0.1, help="Seconds between health checks."),
    max_body_mb: int = typer.Option(
        32, min=1, max=4096, help="Largest request body passed on, MiB (413 past it)."
    ),
    console: bool = typer.Option(
        True,
        "--console/--no-console",
        help="The fleet's page at /console, for whoever logs in with the admin token.",
    ),
    public_url: str | None = typer.Option(
        None,
        help="The https:// address browsers use, when a proxy in front ends TLS: the console's "
        "cookies are then Secure.",
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Spread requests over upstreams (fewest outstanding first), take out those failing
    health checks, retry requests that fail before their first byte elsewhere."""
    import uvicorn

    from llmhost.api.router import Pool, create_router_app, parse_upstream
    from llmhost.observability.logs import setup_logging

    token = os.environ.get("LLMHOST_ROUTER_TOKEN")
    if admin_token_file is not None:
        try:
            token = admin_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {admin_token_file}: {exc.strerror}") from exc
    setup_logging(log_level, "text")
    pool = Pool([parse_upstream(u, i) for i, u in enumerate(upstream)], check_every=check_every)
    if public_url is not None:
        try:
            public_url = check_public_url(public_url, "--public-url")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    app = create_router_app(
        pool,
        admin_token=token,
        retries=retries,
        max_body=max_body_mb << 20,
        console=console,
        secure_cookies=(public_url or "").startswith("https://"),
    )
    Console(stderr=True).print(
        f"router at http://{host}:{port} -> "
        + ", ".join(f"{u.name}={u.shown}" for u in pool.upstreams),
        highlight=False,
    )
    if console and token is not None:
        Console(stderr=True).print(f"console at http://{host}:{port}/console", highlight=False)
    uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=30)
