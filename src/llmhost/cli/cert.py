"""`llmhost cert create`: a self-signed certificate for HTTPS in development and tests."""

from __future__ import annotations

from pathlib import Path

import typer

cert_app = typer.Typer(help="TLS certificates.", no_args_is_help=True)


@cert_app.command()
def create(
    out: Path = typer.Option(Path("."), help="Folder for cert.pem and key.pem."),
    name: list[str] = typer.Option([], "--name", help="DNS name or IP (repeat) [this host]."),
    days: int = typer.Option(365, min=1, max=3650),
) -> None:
    """Write a self-signed ECDSA certificate and its key (0600). Clients must trust cert.pem
    (e.g. `curl --cacert cert.pem`, `httpx.Client(verify="cert.pem")`); use a CA-issued
    certificate in production."""
    from llmhost.security.tls import create_self_signed

    cert, key = create_self_signed(out / "cert.pem", out / "key.pem", name or None, days)
    typer.echo(f"certificate: {cert}\nkey:         {key}")
    typer.echo(f"serve with: llmhost serve ... --ssl-certfile {cert} --ssl-keyfile {key}")
