"""Console single sign-on against a real OpenID Connect provider (npm's oidc-provider under
node, on loopback), the console driven through httpx: an admin's login gives a session and
the console, a non-admin gets the 403 page; unknown, reused and other browsers' states, a
provider's error, a tampered code and an id token of another nonce are refused with 400; a
provider that is down gives a 503 page while the API serves on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from llmhost.api.console.sessions import SESSION_COOKIE
from llmhost.api.console.sso import SSO_COOKIE, challenge
from tests.integration.test_console import Console, console_app
from tests.oidc import (
    ADMIN_GROUP,
    CLIENT_ID,
    CLIENT_SECRET,
    PUBLIC_CLIENT_ID,
    Provider,
    free_port,
    sign_in,
)

REDIRECT = "http://t/console/sso/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    idp = Provider([REDIRECT])
    try:
        yield idp
    finally:
        idp.stop()


def sso_settings(issuer: str) -> dict[str, object]:
    return {
        "oidc_issuer": issuer,
        "oidc_client_id": CLIENT_ID,
        "oidc_client_secret": CLIENT_SECRET,
        "oidc_admin_values": [ADMIN_GROUP],
    }


@pytest.fixture
async def con(tmp_path, provider) -> AsyncIterator[Console]:
    async with console_app(tmp_path, **sso_settings(provider.issuer)) as c:
        yield c


@pytest.fixture
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    """The browser's side at the provider: its own cookies, redirects followed by hand."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def start(con: Console) -> tuple[str, str]:
    """/console/sso/start: the authorization URL it sends the browser to, and the state."""
    r = await con.client.get("/console/sso/start")
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    query = parse_qs(urlsplit(url).query)
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == [REDIRECT]
    return url, query["state"][0]


async def sso_login(con: Console, browser: httpx.AsyncClient, account: str) -> httpx.Response:
    url, _state = await start(con)
    back = await sign_in(browser, url, account)
    assert back.startswith(REDIRECT + "?"), back
    return await con.client.get(back)


async def test_admin_signs_in_and_sees_the_console(con, browser):
    page = await con.client.get("/console/login")
    assert 'href="/console/sso/start"' in page.text and "Log in with SSO" in page.text
    url, state = await start(con)
    assert parse_qs(urlsplit(url).query)["client_id"] == [CLIENT_ID]
    back = await sign_in(browser, url, "alice")
    r = await con.client.get(back)
    assert r.status_code == 200, r.text
    assert "alice@example.com" in r.text
    assert 'http-equiv="refresh"' in r.text
    cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    (session,) = con.app.state.console_app.state.console.sessions._live.values()
    assert session.principal.user_id == "alice@example.com"
    assert session.principal.is_admin and session.principal.via == "sso"

    overview = await con.client.get("/console")
    assert overview.status_code == 200
    assert "alice@example.com" in overview.text and "fake-model" in overview.text

    # The same answer again: its state was used.
    con.client.cookies.set(SSO_COOKIE, state, domain="t.local", path="/console/sso")
    again = await con.client.get(back)
    assert again.status_code == 400
    assert "already used" in again.text


async def test_a_public_client_signs_in_with_pkce_alone(tmp_path, provider, browser):
    settings = {**sso_settings(provider.issuer), "oidc_client_id": PUBLIC_CLIENT_ID}
    del settings["oidc_client_secret"]
    async with console_app(tmp_path, oidc_user_claim="sub", **settings) as con:
        r = await con.client.get("/console/sso/start")
        assert parse_qs(urlsplit(r.headers["location"]).query)["client_id"] == [PUBLIC_CLIENT_ID]
        r = await sso_login(con, browser, "alice")
        assert r.status_code == 200, r.text
        (session,) = con.app.state.console_app.state.console.sessions._live.values()
        assert session.principal.user_id == "alice"  # the sub, as configured


async def test_a_user_outside_the_admin_group_is_refused(con, browser):
    r = await sso_login(con, browser, "bob")
    assert r.status_code == 403
    assert "bob@example.com" in r.text and "not a console admin" in r.text
    assert not any(v.startswith(SESSION_COOKIE + "=") for v in r.headers.get_list("set-cookie"))
    assert len(con.app.state.console_app.state.console.sessions) == 0
    overview = await con.client.get("/console")
    assert overview.status_code == 303
    assert overview.headers["location"] == "/console/login"


async def test_unknown_state_and_other_browsers_are_refused(con, browser):
    r = await con.client.get("/console/sso/callback", params={"state": "made-up", "code": "x"})
    assert r.status_code == 400 and "unknown, expired or already used" in r.text
    r = await con.client.get("/console/sso/callback")
    assert r.status_code == 400

    url, _state = await start(con)
    back = await sign_in(browser, url, "alice")
    # The provider's answer replayed by another browser (no state cookie): refused, and the
    # state is spent, so the first browser cannot use it either.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=con.app), base_url="http://t"
    ) as other:
        r = await other.get(back)
    assert r.status_code == 400 and "not started in this browser" in r.text
    r = await con.client.get(back)
    assert r.status_code == 400 and "already used" in r.text
    assert len(con.app.state.console_app.state.console.sessions) == 0


async def test_the_providers_error_is_shown(con):
    _url, state = await start(con)
    r = await con.client.get(
        "/console/sso/callback",
        params={"state": state, "error": "access_denied", "error_description": "<b>no</b>"},
    )
    assert r.status_code == 400
    assert "&lt;b&gt;no&lt;/b&gt;" in r.text


async def test_a_tampered_code_is_refused(con, browser):
    url, _state = await start(con)
    back = await sign_in(browser, url, "alice")
    parts = urlsplit(back)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["code"] = query["code"][:-2] + ("AA" if not query["code"].endswith("AA") else "BB")
    r = await con.client.get("/console/sso/callback?" + urlencode(query))
    assert r.status_code == 400
    assert "refused the code" in r.text
    assert len(con.app.state.console_app.state.console.sessions) == 0


async def test_an_id_token_of_another_nonce_is_refused(con, browser):
    """A forged callback: the code of an authorization request made with the pending login's
    state and PKCE challenge, but another nonce (an id token replayed from another login)."""
    url, state = await start(con)
    pending = con.app.state.console_app.state.console.oidc.pending.peek(state)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    query.update(nonce="someone-elses-nonce", code_challenge=challenge(pending.verifier))
    forged = url.split("?")[0] + "?" + urlencode(query)
    back = await sign_in(browser, forged, "alice")
    r = await con.client.get(back)
    assert r.status_code == 400
    assert "nonce" in r.text
    assert len(con.app.state.console_app.state.console.sessions) == 0


async def test_a_provider_that_is_down(tmp_path, browser):
    idp = Provider([REDIRECT])
    try:
        async with console_app(tmp_path, **sso_settings(idp.issuer)) as con:
            r = await sso_login(con, browser, "alice")
            assert r.status_code == 200
            idp.stop()
            # Discovery is cached: the login starts, and its code cannot be exchanged.
            _url, state = await start(con)
            r = await con.client.get(
                "/console/sso/callback", params={"state": state, "code": "abc"}
            )
            assert r.status_code == 503, r.text
            assert "cannot be reached" in r.text
            models = await con.client.get(
                "/v1/models", headers={"Authorization": f"Bearer {con.admin}"}
            )
            assert models.status_code == 200
    finally:
        idp.stop()
    # A server that never reached it: the login page still shows, the start is a 503 page.
    silent = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "2").mkdir()
    async with console_app(tmp_path / "2", **sso_settings(silent)) as con:
        assert (await con.client.get("/console/login")).status_code == 200
        r = await con.client.get("/console/sso/start")
        assert r.status_code == 503
        assert "cannot be reached" in r.text
        models = await con.client.get(
            "/v1/models", headers={"Authorization": f"Bearer {con.admin}"}
        )
        assert models.status_code == 200


async def test_no_sso_unless_configured(tmp_path):
    async with console_app(tmp_path) as con:
        page = await con.client.get("/console/login")
        assert page.status_code == 200 and "sso/start" not in page.text
        assert (await con.client.get("/console/sso/start")).status_code == 404
        assert (await con.client.get("/console/sso/callback?state=x&code=y")).status_code == 404


async def test_behind_a_proxy_that_ends_tls(tmp_path, provider):
    """console_public_url: the redirect URI names it (not the plain-HTTP request's scheme and
    Host), and the console's cookies are Secure."""
    public = {"console_public_url": "https://llm.example.com:8443/"}
    async with console_app(tmp_path, **sso_settings(provider.issuer), **public) as con:
        r = await con.client.get("/console/sso/start")
        assert r.status_code == 303, r.text
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["redirect_uri"] == ["https://llm.example.com:8443/console/sso/callback"]
        sso = next(v for v in r.headers.get_list("set-cookie") if v.startswith(SSO_COOKIE))
        assert "secure" in {part.strip().lower() for part in sso.split(";")}
        page = await con.client.get("/console/login")
        login = next(v for v in page.headers.get_list("set-cookie") if "login" in v)
        assert "secure" in login.lower()


@pytest.mark.parametrize(
    "bad",
    [
        "llm.example.com",
        "ftp://llm.example.com",
        "https://",
        "https://h/llm",
        "https://h/?x=1",
        "https://u:p@h",
        "https://h/#f",
    ],
)
def test_public_url_must_be_a_scheme_and_host(tmp_path, bad):
    from llmhost.config import Settings

    with pytest.raises(ValueError, match="console_public_url"):
        Settings(home=tmp_path, console_public_url=bad)


async def test_sign_ins_started_are_limited_per_address(con):
    codes = [(await con.client.get("/console/sso/start")).status_code for _ in range(22)]
    assert codes[:20] == [303] * 20
    assert codes[20:] == [429, 429]
    r = await con.client.get("/console/sso/start")
    assert "wait a minute" in r.text
    oidc = con.app.state.console_app.state.console.oidc
    assert len(oidc.pending) == 20  # the refused ones hold no pending login
    # the API key login is not affected
    assert (await con.login(con.admin)).status_code == 303
