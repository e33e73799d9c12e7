"""The console's SSO pieces on their own: the pending logins (one use, ten minutes, bounded),
role and user claims, and the id token check against a key set served by a scripted
transport (keys read again once on an unknown kid, only asymmetric listed algorithms, the
60 s clock skew, issuer, audience and nonce)."""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from llmhost.api.console.sso import (
    MAX_PENDING,
    PENDING_S,
    Oidc,
    PendingLogins,
    SsoError,
    challenge,
    is_admin,
    user_id,
)
from llmhost.config import Settings

ISSUER = "https://idp.example"


def test_pending_logins_are_used_once_expire_and_are_bounded():
    now = [1000.0]
    pending = PendingLogins(clock=lambda: now[0])
    state, login = pending.start("https://h/console/sso/callback")
    assert pending.take(state) is login
    assert pending.take(state) is None  # used
    state, _ = pending.start("r")
    now[0] += PENDING_S + 1
    assert pending.take(state) is None  # expired
    assert pending.take("x" * 1000) is None
    first, _ = pending.start("r")
    for _ in range(MAX_PENDING + 10):
        pending.start("r")
    assert len(pending) == MAX_PENDING
    assert pending.take(first) is None  # the oldest made room


def test_pkce_challenge_is_rfc7636s_example():
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_role_and_user_claims():
    claims = {"sub": "u1", "realm_access": {"roles": ["ops", "llm-admin"]}, "groups": "llm-admin"}
    assert is_admin(claims, "realm_access.roles", ["llm-admin"])
    assert is_admin(claims, "groups", ["llm-admin"])  # one value, not a list
    assert not is_admin(claims, "realm_access.roles", ["root"])
    assert not is_admin(claims, "realm_access.roles.x", ["llm-admin"])
    assert not is_admin(claims, "missing", ["llm-admin"])
    assert user_id({"sub": "u1", "email": "a@b"}, "email") == "a@b"
    assert user_id({"sub": "u1", "email": ""}, "email") == "u1"
    assert user_id({"sub": "u1"}, "preferred_username") == "u1"


class Idp:
    """A discovery document and a key set behind a scripted transport, counting key reads."""

    def __init__(self) -> None:
        self.keys = {
            kid: rsa.generate_private_key(public_exponent=65537, key_size=2048)
            for kid in ("old", "new")
        }
        self.published = ["old"]
        self.jwks_reads = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "authorization_endpoint": ISSUER + "/auth",
                    "token_endpoint": ISSUER + "/token",
                    "jwks_uri": ISSUER + "/jwks",
                    "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],
                },
            )
        if request.url.path == "/jwks":
            self.jwks_reads += 1
            keys = []
            for kid in self.published:
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
                keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            return httpx.Response(200, json={"keys": keys})
        return httpx.Response(404)

    def token(self, kid: str = "old", **overrides: object) -> str:
        return jwt.encode(
            id_claims(**overrides), self.keys[kid], algorithm="RS256", headers={"kid": kid}
        )


def id_claims(**overrides: object) -> dict[str, object]:
    """An id token's claims as the provider issues them for the console, valid from now;
    `overrides` replace some (None: left out)."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "console",
        "sub": "u1",
        "iat": now,
        "exp": now + 300,
        "nonce": "n1",
        **overrides,
    }
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def idp() -> Idp:
    return Idp()


async def check(idp: Idp, oidc: Oidc, token: str, nonce: str = "n1") -> dict:
    async with httpx.AsyncClient(transport=httpx.MockTransport(idp.handler)) as client:
        doc = await oidc.discovery(client)
        return await oidc.verify(client, doc, token, nonce)


def make_oidc() -> Oidc:
    return Oidc(Settings(oidc_issuer=ISSUER, oidc_client_id="console", oidc_admin_values=["a"]))


async def test_keys_are_read_again_once_on_an_unknown_kid(idp):
    oidc = make_oidc()
    assert (await check(idp, oidc, idp.token("old")))["sub"] == "u1"
    assert (await check(idp, oidc, idp.token("old")))["sub"] == "u1"
    assert idp.jwks_reads == 1  # cached
    idp.published = ["old", "new"]  # the provider rolled its keys
    assert (await check(idp, oidc, idp.token("new")))["sub"] == "u1"
    assert idp.jwks_reads == 2
    with pytest.raises(SsoError, match="does not list"):
        await check(idp, oidc, forged(idp))
    assert idp.jwks_reads == 3  # once more, not in a loop


def forged(idp: Idp) -> str:
    """A token naming a kid the provider never published."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(id_claims(), key, algorithm="RS256", headers={"kid": "unknown"})


async def test_an_unknown_kid_on_the_first_read_is_not_read_twice(idp):
    with pytest.raises(SsoError, match="does not list"):
        await check(idp, make_oidc(), forged(idp))
    assert idp.jwks_reads == 1


async def test_a_key_of_another_type_is_refused(idp):
    from cryptography.hazmat.primitives.asymmetric import ec

    token = jwt.encode(
        id_claims(),
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "old"},  # the provider's RSA key
    )
    oidc = make_oidc()
    async with httpx.AsyncClient(transport=httpx.MockTransport(idp.handler)) as client:
        doc = {
            **(await oidc.discovery(client)),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }
        with pytest.raises(SsoError, match="not valid"):
            await oidc.verify(client, doc, token, "n1")


async def test_a_token_signed_by_another_key_under_a_known_kid_is_refused(idp):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(id_claims(), key, algorithm="RS256", headers={"kid": "old"})
    with pytest.raises(SsoError, match="Signature verification failed"):
        await check(idp, make_oidc(), token)


async def test_symmetric_and_unsigned_tokens_are_refused_though_listed(idp):
    claims = id_claims()
    hs = jwt.encode(claims, "a-shared-secret-of-thirty-two-chars!", algorithm="HS256")
    with pytest.raises(SsoError, match="not allowed"):
        await check(idp, make_oidc(), hs)
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(SsoError, match="not allowed"):
        await check(idp, make_oidc(), unsigned)


@pytest.mark.parametrize(
    ("overrides", "nonce", "error"),
    [
        ({"exp": -90}, "n1", "expired"),  # seconds from when the test runs
        ({"iat": 300}, "n1", "not yet valid"),
        ({"iss": "https://other.example"}, "n1", "issuer"),
        ({"aud": "another-client"}, "n1", "(?i)audience"),
        ({"aud": ["console", "another"], "azp": "another"}, "n1", "another client"),
        ({}, "n2", "nonce"),
        ({"nonce": None}, "n1", "nonce"),
    ],
)
async def test_claims_checked(idp, overrides, nonce, error):
    # times are offsets from now, taken as the test runs: a time fixed when the tests were
    # collected is minutes old by the time a long run reaches this one
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "iat") else v for k, v in overrides.items()}
    with pytest.raises(SsoError, match=error):
        await check(idp, make_oidc(), idp.token(**claims), nonce)


async def test_clock_skew_of_a_minute_is_allowed(idp):
    late = idp.token(exp=int(time.time()) - 30)
    assert (await check(idp, make_oidc(), late))["sub"] == "u1"


def test_settings(monkeypatch):
    monkeypatch.setenv("LLMHOST_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("LLMHOST_OIDC_CLIENT_ID", "console")
    monkeypatch.setenv("LLMHOST_OIDC_ADMIN_VALUES", "llm-admin, ops")
    s = Settings()
    assert s.oidc_admin_values == ["llm-admin", "ops"]
    assert (s.oidc_scopes, s.oidc_role_claim, s.oidc_user_claim) == (
        "openid email profile",
        "groups",
        "email",
    )
    monkeypatch.setenv("LLMHOST_OIDC_ADMIN_VALUES", '["a,b", "c"]')
    assert Settings().oidc_admin_values == ["a,b", "c"]
    monkeypatch.setenv("LLMHOST_OIDC_ADMIN_VALUES", "")
    with pytest.raises(ValueError, match="oidc_admin_values"):
        Settings()
    with pytest.raises(ValueError, match="http"):
        Settings(oidc_issuer="idp.example", oidc_admin_values=["a"])
