"""Console single sign-on through an OpenID Connect provider: the authorization code flow with
PKCE (S256), state and nonce kept here, the id token verified with the provider's JWKS, and
admins told apart by a role claim. The provider's discovery document and keys are cached; a
provider that cannot be reached gives a 502/503 page, never a 500, and the API serves on."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from llmhost.api.console.pages import Refused, console_of, render, start_session
from llmhost.api.console.sessions import COOKIE_PATH
from llmhost.config import Settings
from llmhost.security.auth import Principal

log = logging.getLogger("llmhost.console")

PENDING_S = 600  # a login started must come back within this
MAX_PENDING = 1024  # logins started and not yet back; past this the oldest is dropped
SSO_STARTS = RateLimitItemPerMinute(20)  # sign-ins one client address may start
MAX_STATE_CHARS = 128
MAX_CODE_CHARS = 4096
MAX_RESPONSE_BYTES = 1024 * 1024  # discovery, JWKS and token responses are a few KiB
DISCOVERY_S = 3600.0  # the discovery document and the keys are read again after this
LEEWAY_S = 60
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Only public-key signatures: an HMAC id token would be signed with the client secret.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class SsoError(Exception):
    """A login the console refuses or cannot finish, with the page's status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Pending:
    verifier: str  # PKCE code verifier
    nonce: str
    redirect_uri: str
    expires: float


class PendingLogins:
    """Logins sent to the provider, by state: at most `MAX_PENDING`, each used once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._live: OrderedDict[str, Pending] = OrderedDict()

    def start(self, redirect_uri: str) -> tuple[str, Pending]:
        now = self._clock()
        while self._live and next(iter(self._live.values())).expires <= now:
            self._live.popitem(last=False)
        while len(self._live) >= MAX_PENDING:
            self._live.popitem(last=False)
        state = secrets.token_urlsafe(32)
        pending = Pending(
            secrets.token_urlsafe(48), secrets.token_urlsafe(32), redirect_uri, now + PENDING_S
        )
        self._live[state] = pending
        return state, pending

    def take(self, state: str) -> Pending | None:
        """The login `state` names, ended; None if unknown, used or expired."""
        if len(state) > MAX_STATE_CHARS:
            return None
        pending = self._live.pop(state, None)
        if pending is None or pending.expires <= self._clock():
            return None
        return pending

    def peek(self, state: str) -> Pending | None:
        return self._live.get(state)

    def __len__(self) -> int:
        return len(self._live)


def challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def claim(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (realm_access.roles), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def is_admin(claims: dict[str, Any], path: str, admin_values: list[str]) -> bool:
    value = claim(claims, path)
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return any(isinstance(v, str) and v in admin_values for v in values)


def user_id(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        value = claims["sub"]
    return str(value)[:256]


class Oidc:
    """One provider, as the settings name it; its documents cached."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        if settings.oidc_issuer is None or settings.oidc_client_id is None:
            raise ValueError("SSO is not configured")
        self.issuer = settings.oidc_issuer
        self.client_id = settings.oidc_client_id
        self.secret = settings.oidc_client_secret
        self.scopes = settings.oidc_scopes
        self.role_claim = settings.oidc_role_claim
        self.admin_values = list(settings.oidc_admin_values)
        self.user_claim = settings.oidc_user_claim
        self.pending = PendingLogins(clock)
        self.starts = MovingWindowRateLimiter(MemoryStorage())  # sign-ins started, per address
        self._clock = clock
        self._discovery: dict[str, Any] | None = None
        self._discovered_at = 0.0
        self._keys: jwt.PyJWKSet | None = None

    async def _get_json(self, client: httpx.AsyncClient, url: str, what: str) -> Any:
        try:
            async with client.stream("GET", url, headers={"accept": "application/json"}) as r:
                body = await _read_bounded(r)
        except httpx.HTTPError as exc:
            log.warning("SSO: the provider's %s at %s cannot be read: %s", what, url, exc)
            raise SsoError(503, f"The sign-in provider cannot be reached ({what}).") from None
        if r.status_code != 200:
            raise SsoError(502, f"The sign-in provider's {what} answered {r.status_code}.")
        try:
            return json.loads(body)
        except ValueError:
            raise SsoError(502, f"The sign-in provider's {what} is not JSON.") from None

    async def discovery(self, client: httpx.AsyncClient) -> dict[str, Any]:
        if self._discovery is not None and self._clock() - self._discovered_at < DISCOVERY_S:
            return self._discovery
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(client, url, "discovery document")
        needed = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in needed):
            raise SsoError(502, "The sign-in provider's discovery document is incomplete.")
        if doc["issuer"] != self.issuer:
            raise SsoError(502, "The provider names an issuer other than the one configured.")
        self._discovery, self._discovered_at = doc, self._clock()
        self._keys = None
        return doc

    def algorithms(self, doc: dict[str, Any]) -> list[str]:
        listed = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
        if not isinstance(listed, list):
            return []
        return [a for a in listed if isinstance(a, str) and a in ASYMMETRIC]

    async def authorize_url(self, client: httpx.AsyncClient, redirect_uri: str) -> tuple[str, str]:
        """Where to send the browser, and the state of the login it starts."""
        doc = await self.discovery(client)
        state, pending = self.pending.start(redirect_uri)
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "scope": self.scopes,
            "state": state,
            "nonce": pending.nonce,
            "code_challenge": challenge(pending.verifier),
            "code_challenge_method": "S256",
        }
        endpoint: str = doc["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(query), state

    async def _key(self, client: httpx.AsyncClient, doc: dict[str, Any], kid: str | None) -> Any:
        """The signing key `kid` names; the keys are read again once if it is unknown."""
        read = False
        while True:
            if self._keys is None:
                jwks = await self._get_json(client, doc["jwks_uri"], "key set")
                read = True
                if not isinstance(jwks, dict):
                    raise SsoError(502, "The provider's key set is not a JWKS.")
                try:
                    self._keys = jwt.PyJWKSet.from_dict(jwks)
                except (jwt.PyJWKSetError, jwt.InvalidKeyError, TypeError) as exc:
                    raise SsoError(502, f"The provider's key set is unusable: {exc}") from None
            keys = [k for k in self._keys.keys if kid is None or k.key_id == kid]
            if kid is None and len(keys) > 1:
                raise SsoError(400, "The id token names no key and the provider has several.")
            if keys:
                return keys[0].key
            if read:
                raise SsoError(400, "The id token is signed with a key the provider does not list.")
            self._keys = None  # rolled keys: read them again, once

    async def finish(
        self, client: httpx.AsyncClient, code: str, pending: Pending
    ) -> dict[str, Any]:
        """The id token's verified claims for the code the provider sent back."""
        doc = await self.discovery(client)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.verifier,
            "client_id": self.client_id,
        }
        auth: httpx.BasicAuth | None = None
        if self.secret is not None:
            methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
            if not isinstance(methods, list) or "client_secret_basic" in methods:
                auth = httpx.BasicAuth(self.client_id, self.secret)
            else:
                form["client_secret"] = self.secret
        try:
            async with client.stream(
                "POST", doc["token_endpoint"], data=form, auth=auth or httpx.USE_CLIENT_DEFAULT
            ) as r:
                body = await _read_bounded(r)
        except httpx.HTTPError as exc:
            log.warning("SSO: the token endpoint cannot be reached: %s", exc)
            raise SsoError(503, "The sign-in provider cannot be reached (token).") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if r.status_code != 200 or not isinstance(answer, dict):
            if r.status_code >= 500 or not isinstance(answer, dict):
                raise SsoError(502, f"The provider's token endpoint answered {r.status_code}.")
            error = str(answer.get("error_description") or answer.get("error") or "refused")
            raise SsoError(400, f"The sign-in provider refused the code: {error[:300]}")
        token = answer.get("id_token")
        if not isinstance(token, str) or len(token) > MAX_RESPONSE_BYTES:
            raise SsoError(502, "The sign-in provider sent no id token.")
        return await self.verify(client, doc, token, pending.nonce)

    async def verify(
        self, client: httpx.AsyncClient, doc: dict[str, Any], token: str, nonce: str
    ) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise SsoError(400, f"The id token is malformed: {exc}") from None
        algorithms = self.algorithms(doc)
        if header.get("alg") not in algorithms:
            raise SsoError(400, f"The id token's algorithm {header.get('alg')!r} is not allowed.")
        kid = header.get("kid")
        key = await self._key(client, doc, kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.client_id,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # a key of another type: TypeError
            raise SsoError(400, f"The id token is not valid: {exc}") from None
        several = isinstance(claims.get("aud"), list) and len(claims["aud"]) > 1
        if several and claims.get("azp") != self.client_id:
            raise SsoError(400, "The id token was issued to another client.")
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(
            claims["nonce"].encode(), nonce.encode()
        ):
            raise SsoError(400, "The id token's nonce is not this login's.")
        return claims


async def _read_bounded(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise SsoError(502, "The sign-in provider's answer is too large.")
        chunks.append(chunk)
    return b"".join(chunks)


def http_client() -> httpx.AsyncClient:
    """The console's client for the provider: bounded in time, no redirects followed."""
    return httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False)


# --- pages -----------------------------------------------------------------------------------

SSO_COOKIE = "llmhost_console_sso"  # ties the provider's answer to the browser that asked
SSO_PATH = COOKIE_PATH + "/sso"


def redirect_uri(request: Request) -> str:
    """Where the provider sends the browser back: under the configured public URL (behind a
    proxy that ends TLS), else under the scheme and Host this request came with."""
    base = console_of(request).public_url or str(request.base_url)
    return base.rstrip("/") + SSO_PATH + "/callback"


def oidc_of(request: Request) -> Oidc:
    oidc = console_of(request).oidc
    if oidc is None:
        raise Refused(404, "single sign-on is not configured on this server")
    return oidc


def sso_refused(request: Request, exc: SsoError) -> Response:
    title = "Sign-in provider unavailable" if exc.status >= 500 else "Sign-in refused"
    response = render(
        request, "error.html", exc.status, title=title, message=exc.message, session=None
    )
    response.delete_cookie(SSO_COOKIE, path=SSO_PATH)
    return response


async def sso_start(request: Request) -> Response:
    oidc = oidc_of(request)
    address = (request.client.host if request.client else "?")[:64]
    if not await oidc.starts.hit(SSO_STARTS, address):
        # each start holds a pending login (and may ask the provider): bounded per address
        return sso_refused(
            request, SsoError(429, "Too many sign-ins started from this address: wait a minute.")
        )
    try:
        async with http_client() as client:
            url, state = await oidc.authorize_url(client, redirect_uri(request))
    except SsoError as exc:
        return sso_refused(request, exc)
    response = RedirectResponse(url, status_code=303)
    # Lax, not strict: the provider's redirect back is a cross-site navigation.
    response.set_cookie(
        SSO_COOKIE,
        state,
        max_age=PENDING_S,
        path=SSO_PATH,
        httponly=True,
        samesite="lax",
        secure=console_of(request).secure_cookies,
    )
    return response


async def sso_callback(request: Request) -> Response:
    oidc = oidc_of(request)
    params = request.query_params
    state = params.get("state", "")
    pending = oidc.pending.take(state) if state else None
    try:
        if pending is None:
            raise SsoError(400, "This sign-in is unknown, expired or already used: start again.")
        cookie = request.cookies.get(SSO_COOKIE, "")
        if not secrets.compare_digest(cookie.encode(), state.encode()):
            raise SsoError(400, "This sign-in was not started in this browser: start again.")
        if "error" in params:
            error = params.get("error_description") or params["error"]
            raise SsoError(400, f"The sign-in provider refused: {error[:300]}")
        code = params.get("code", "")
        if not code or len(code) > MAX_CODE_CHARS:
            raise SsoError(400, "The sign-in provider sent no code.")
        async with http_client() as client:
            claims = await oidc.finish(client, code, pending)
    except SsoError as exc:
        log.warning("console SSO login refused: %s", exc.message[:300])
        return sso_refused(request, exc)
    who = user_id(claims, oidc.user_claim)
    if not is_admin(claims, oidc.role_claim, oidc.admin_values):
        log.warning("console SSO login of %s refused: not an admin", who)
        response = render(
            request,
            "error.html",
            403,
            title="Admins only",
            message=f"{who} signed in, but is not a console admin: the console is for admins.",
            session=None,
        )
        response.delete_cookie(SSO_COOKIE, path=SSO_PATH)
        return response
    principal = Principal(who, "admin", via="sso")
    # A page that moves on, not a redirect: after the provider's cross-site redirect the
    # browser would hold back the strict session cookie on a redirect's next hop.
    response = render(request, "sso_done.html", user=who, session=None)
    start_session(request, principal, response)
    response.delete_cookie(SSO_COOKIE, path=SSO_PATH)
    return response


def install_sso(app: FastAPI) -> None:
    app.add_api_route(SSO_PATH + "/start", sso_start, methods=["GET"])
    app.add_api_route(SSO_PATH + "/callback", sso_callback, methods=["GET"])
