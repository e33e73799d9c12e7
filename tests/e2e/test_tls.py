"""HTTPS: `llmhost cert create`, a server on it, a client that verifies the certificate, and
refusals of plain HTTP, old TLS versions and an unknown certificate."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import Server


def test_https_with_verified_self_signed_certificate(tmp_path):
    env = {**os.environ, "LLMHOST_HOME": str(tmp_path)}
    p = subprocess.run(
        [sys.executable, "-m", "llmhost", "cert", "create", "--out", str(tmp_path / "tls")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    srv = Server(tmp_path, "--demo", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    try:
        srv.wait_ready()
        client = OpenAI(
            base_url=srv.url + "/v1", api_key="x", http_client=httpx.Client(verify=str(cert))
        )
        with client:  # greedy: sampled, the demo model may end its turn before a token
            out = client.completions.create(
                model="llmhost-demo", prompt="hi", max_tokens=3, temperature=0
            )
        assert out.usage.completion_tokens >= 1
        with pytest.raises(httpx.ConnectError):  # not the certificate it trusts
            httpx.get(srv.url + "/health", timeout=5)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        old = ssl.create_default_context(cafile=str(cert))
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", verify=old, timeout=5)
        modern = ssl.create_default_context(cafile=str(cert))
        modern.minimum_version = ssl.TLSVersion.TLSv1_2
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        assert httpx.get(srv.url + "/health", verify=modern, timeout=5).status_code == 200
    finally:
        assert srv.stop() == 0


def test_bad_tls_files_fail_with_one_line(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "serve",
            "--demo",
            "--ssl-certfile",
            str(junk),
            "--ssl-keyfile",
            str(junk),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMHOST_HOME": str(tmp_path)},
        timeout=60,
    )
    assert p.returncode == 2 and "cannot use" in p.stderr and "Traceback" not in p.stderr
