"""Authentication: API keys (revoked, expired, never stored in clear) and JWTs under attack —
alg none, HS256 signed with the RS public key, wrong key, expired, not yet valid, wrong
aud/iss, tampered payload, garbled headers: each a 401 with a clear message, never a 500."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from llmhost.api import create_app
from llmhost.config import Settings
from llmhost.engines.fake import FakeEngine
from llmhost.security.auth import KeyStore

SECRET = "s" * 40
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUB = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(**over) -> dict:
    now = int(time.time())
    return {"sub": "alice", "exp": now + 600, "iat": now, "aud": "llmhost", "iss": "idp", **over}


async def call(settings: Settings, headers: dict) -> httpx.Response:
    app = create_app(FakeEngine(), settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(
                "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers
            )


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def hs_settings(tmp_path) -> Settings:
    return Settings(
        home=tmp_path, jwt_secret=SECRET, jwt_audience="llmhost", jwt_issuer="idp", audit=False
    )


def rs_settings(tmp_path) -> Settings:
    pem = tmp_path / "pub.pem"
    pem.write_bytes(RSA_PUB)
    return Settings(
        home=tmp_path,
        jwt_algorithm="RS256",
        jwt_public_key=pem,
        jwt_audience="llmhost",
        jwt_issuer="idp",
        audit=False,
    )


async def test_valid_tokens_pass(tmp_path):
    r = await call(hs_settings(tmp_path), bearer(jwt.encode(claims(), SECRET, "HS256")))
    assert r.status_code == 200, r.text
    r = await call(rs_settings(tmp_path), bearer(jwt.encode(claims(), RSA_KEY, "RS256")))
    assert r.status_code == 200, r.text


def _unsigned(payload: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(payload)}."


def _tampered() -> str:
    head, body, sig = jwt.encode(claims(), SECRET, "HS256").split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["sub"] = "admin"
    new = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{head}.{new}.{sig}"


@pytest.mark.parametrize(
    "which, make, fragment",
    [
        ("hs", lambda: _unsigned(claims()), "algorithm not allowed"),
        ("rs", lambda: _unsigned(claims()), "algorithm not allowed"),
        ("rs", lambda: _hs_with_rs_public_key(), "algorithm not allowed"),
        ("hs", lambda: jwt.encode(claims(), "x" * 40, "HS256"), "signature"),
        ("rs", lambda: jwt.encode(claims(), EC_KEY, "ES256"), "algorithm not allowed"),
        ("hs", lambda: jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, "HS256"), "expired"),
        ("hs", lambda: jwt.encode(claims(nbf=int(time.time()) + 3600), SECRET, "HS256"), "not yet"),
        ("hs", lambda: jwt.encode(claims(aud="other"), SECRET, "HS256"), "audience"),
        ("hs", lambda: jwt.encode(claims(iss="evil"), SECRET, "HS256"), "issuer"),
        (
            "hs",
            lambda: jwt.encode({"sub": "a", "aud": "llmhost", "iss": "idp"}, SECRET, "HS256"),
            "exp",
        ),
        ("hs", lambda: jwt.encode(claims(sub=""), SECRET, "HS256"), "sub"),
        ("hs", _tampered, "signature"),
        ("hs", lambda: "abc.def.ghi", "malformed"),
        ("hs", lambda: "eyJ!!!.eyJ.x", "malformed"),
        ("hs", lambda: "not-a-token", "invalid credentials"),
    ],
)
async def test_jwt_attacks_are_401(tmp_path, which, make, fragment):
    settings = hs_settings(tmp_path) if which == "hs" else rs_settings(tmp_path)
    r = await call(settings, bearer(make()))
    assert r.status_code == 401, r.text
    assert fragment in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"].startswith("Bearer")


def _hs_with_rs_public_key() -> str:
    # The classic confusion: sign HS256 with the server's RSA public key as the secret.
    header = {"alg": "HS256", "typ": "JWT"}
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    signing = enc(json.dumps(header).encode()) + b"." + enc(json.dumps(claims()).encode())
    import hashlib
    import hmac

    sig = hmac.new(RSA_PUB, signing, hashlib.sha256).digest()
    return (signing + b"." + enc(sig)).decode()


@pytest.mark.parametrize(
    "headers, fragment",
    [
        ({}, "missing credentials"),
        ({"Authorization": "Basic YWxpY2U6cHc="}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
        ({"Authorization": "Bearer llmh_nounderscore"}, "malformed API key"),
        ({"Authorization": "Bearer llmh_abc_wrongsecret"}, "invalid API key"),
    ],
)
async def test_missing_and_garbled_credentials(tmp_path, headers, fragment):
    r = await call(hs_settings(tmp_path), headers)
    assert r.status_code == 401 and fragment in r.json()["error"]["message"]


async def test_api_keys_revoked_expired_and_hashed(tmp_path):
    settings = Settings(home=tmp_path, audit=False)
    keys = KeyStore(settings.keys_db)
    good, info = keys.create("bob", "admin", rpm=10)
    short, _ = keys.create("carol", expires_in=0.5)
    keys.close()
    assert (await call(settings, bearer(good))).status_code == 200
    assert (await call(settings, bearer(short))).status_code == 200
    await asyncio.sleep(0.6)
    r = await call(settings, bearer(short))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    keys = KeyStore(settings.keys_db)
    keys.revoke(info.key_id)
    keys.close()
    r = await call(settings, bearer(good))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    secret = good.split("_", 2)[2]
    dump = "\n".join(sqlite3.connect(settings.keys_db).iterdump())
    assert secret not in dump and info.key_id in dump
    assert oct(settings.keys_db.stat().st_mode & 0o777) == "0o600"


async def test_public_paths_and_no_auth(tmp_path):
    app = create_app(FakeEngine(), Settings(home=tmp_path, audit=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/openapi.json")).status_code == 200
            assert (await c.get("/v1/models")).status_code == 401
    r = await call(Settings(home=tmp_path, auth=False, audit=False), {})
    assert r.status_code == 200


def test_keys_cli(tmp_path):
    env = {**os.environ, "LLMHOST_HOME": str(tmp_path)}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "llmhost", "keys", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    p = cli("create", "--user", "dave", "--role", "admin", "--expires", "30d", "--rpm", "60")
    assert p.returncode == 0 and p.stdout.startswith("llmh_"), p.stderr
    assert "cannot be shown again" in p.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert [(k["user_id"], k["role"], k["state"], k["rpm"]) for k in listed] == [
        ("dave", "admin", "active", 60)
    ]
    assert p.stdout.strip().split("_", 2)[2] not in cli("list", "--json").stdout
    kid = listed[0]["key_id"]
    assert cli("revoke", kid).returncode == 0
    again = cli("revoke", kid)
    assert again.returncode != 0 and "already revoked" in again.stderr
    bad = cli("create", "--user", "x", "--role", "root")
    assert bad.returncode == 2 and "role" in bad.stderr and "Traceback" not in bad.stderr


async def test_admin_endpoint_needs_admin_role(tmp_path):
    settings = Settings(home=tmp_path, rate_limit_rps=0)
    keys = KeyStore(settings.keys_db)
    admin, _ = keys.create("root", "admin")
    user, _ = keys.create("joe")
    keys.close()
    app = create_app(FakeEngine(), settings)
    async with app.router.lifespan_context(app):
        while not app.state.ready:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post(
                "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=bearer(user)
            )
            assert r.status_code == 200
            r = await c.get("/v1/admin/audit", headers=bearer(user))
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
            for _ in range(50):  # the writer is asynchronous
                r = await c.get("/v1/admin/audit?user=joe", headers=bearer(admin))
                if r.json()["data"]:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 200
            assert [(x["user_id"], x["status"]) for x in r.json()["data"]] == [("joe", 200)]
            assert (await c.get("/v1/admin/audit")).status_code == 401


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_keys_db_and_its_wal_are_owner_only_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        keys = KeyStore(tmp_path / "home" / "keys.db")
        keys.create("alice")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "home").st_mode & 0o777 == 0o700
    for name in ("keys.db", "keys.db-wal", "keys.db-shm"):
        assert os.stat(tmp_path / "home" / name).st_mode & 0o777 == 0o600, name
    keys.close()
