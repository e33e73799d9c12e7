"""A real OpenID Connect provider on loopback for the console's SSO tests: npm's certified
`oidc-provider` under node, installed once into a cache folder outside the repository, with a
confidential client and a public one (PKCE required of both), two accounts (alice in the admin
group, bob not) and its built-in login and consent pages; and a helper that walks those pages
as a browser would."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from html import unescape
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.conftest import IN_CI

VERSION = "9"
CLIENT_ID = "llmhost-console"
CLIENT_SECRET = "a-test-secret-of-some-length-0123456789"
PUBLIC_CLIENT_ID = CLIENT_ID + "-public"
ADMIN_GROUP = "llm-admins"
ACCOUNTS = {
    "alice": {"email": "alice@example.com", "groups": [ADMIN_GROUP, "staff"]},
    "bob": {"email": "bob@example.com", "groups": ["staff"]},
}

SCRIPT = r"""
import Provider from 'oidc-provider';

const [port, clientId, secret, redirects, accounts] = [
  Number(process.argv[2]), process.argv[3], process.argv[4],
  JSON.parse(process.argv[5]), JSON.parse(process.argv[6]),
];
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: clientId,
    client_secret: secret,
    redirect_uris: redirects,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }, {
    client_id: `${clientId}-public`,  // a public client: PKCE alone
    redirect_uris: redirects,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'none',
  }],
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name', 'groups'] },
  conformIdTokenClaims: false,  // the scopes' claims in the id token too, as Keycloak does
  cookies: { keys: ['llmhost-test-cookie-key'] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    if (!accounts[id]) return undefined;
    return {
      accountId: id,
      async claims() { return { sub: id, email_verified: true, name: id, ...accounts[id] }; },
    };
  },
});
provider.listen(port, '127.0.0.1', () => console.log('listening'));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider_dir() -> Path:
    """The cache folder holding oidc-provider, installed there with npm if missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if IN_CI:
            pytest.fail("node and npm (Debian packages nodejs, npm) are required in CI")
        pytest.skip("node/npm not installed")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = root / "llmhost-test" / "oidc-provider"
    if not (folder / "node_modules" / "oidc-provider" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "llmhost-oidc-test", "private": true}\n')
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", f"oidc-provider@{VERSION}"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            message = f"npm install oidc-provider failed: {done.stderr[-2000:]}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
    (folder / "provider.mjs").write_text(SCRIPT)
    return folder


class Provider:
    """oidc-provider on a loopback port (a free one by default), accepting `redirect_uris`."""

    def __init__(self, redirect_uris: list[str], port: int | None = None):
        self.folder = provider_dir()
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.log = self.folder / f"provider-{self.port}.log"
        args = [json.dumps(redirect_uris), json.dumps(ACCOUNTS)]
        self.proc = subprocess.Popen(
            ["node", "provider.mjs", str(self.port), CLIENT_ID, CLIENT_SECRET, *args],
            cwd=self.folder,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"oidc-provider exited: {self.log.read_text()[-3000:]}")
            try:
                url = self.issuer + "/.well-known/openid-configuration"
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"oidc-provider not up: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')


async def sign_in(client: httpx.AsyncClient, authorize_url: str, account: str) -> str:
    """Walks the provider's login and consent pages for `account` from the authorization URL,
    as a browser would; returns the URL the provider sends the browser back to (the redirect
    URI with a code, or an error)."""
    provider = urlsplit(authorize_url).netloc
    r = await client.get(authorize_url)
    for _ in range(16):
        if r.status_code in (302, 303):
            location = urljoin(str(r.url), r.headers["location"])
            if urlsplit(location).netloc != provider:
                return location
            r = await client.get(location)
            continue
        assert r.status_code == 200, (r.status_code, r.text[:2000])
        match = FORM.search(r.text)
        assert match is not None, r.text[:2000]
        fields = {unescape(k): unescape(v) for k, v in HIDDEN.findall(match.group(2))}
        if fields.get("prompt") == "login":
            fields.update(login=account, password="any")
        r = await client.post(urljoin(str(r.url), unescape(match.group(1))), data=fields)
    raise AssertionError("the provider's pages did not end in a redirect back")
