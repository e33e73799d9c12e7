"""Console single sign-on in a real headless Chromium (Playwright) against a real `llmhost
serve` (tiny real model, authentication on) and a real OpenID Connect provider (oidc-provider
under node): the admin clicks "Log in with SSO", signs in and consents on the provider's
pages, lands on the console under their email, makes a key (audited under that name) and logs
out; a user outside the admin group is shown the 403 page and gets no session."""

from __future__ import annotations

import httpx

from tests.conftest import require, require_exe
from tests.e2e.conftest import Server
from tests.oidc import ADMIN_GROUP, CLIENT_ID, CLIENT_SECRET, Provider, free_port

TIMEOUT_MS = 60_000


def test_sso_in_a_browser(tiny_model, tmp_path):
    chromium = require_exe("chromium", "chromium")
    require("playwright")
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    (home / "config.toml").write_text(
        f'oidc_issuer = "{issuer}"\n'
        f'oidc_client_id = "{CLIENT_ID}"\n'
        f'oidc_client_secret = "{CLIENT_SECRET}"\n'
        f'oidc_admin_values = ["{ADMIN_GROUP}"]\n'
    )
    srv = Server(home, str(tiny_model.gguf), "--ctx-size", "512", auth=True)
    idp: Provider | None = None
    try:
        idp = Provider([srv.url + "/console/sso/callback"], port=idp_port)
        srv.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                expect.set_options(timeout=TIMEOUT_MS)
                admin = browser.new_context().new_page()
                admin.set_default_timeout(TIMEOUT_MS)
                problems: list[str] = []
                admin.on(
                    "console",
                    lambda m: problems.append(m.text) if "Content Security" in m.text else None,
                )
                sign_in(admin, srv.url, "alice")
                expect(admin).to_have_url(srv.url + "/console")
                expect(admin.locator("header .who")).to_have_text("alice@example.com")

                # what the admin does is audited under the name the provider gave
                admin.click("nav >> text=Keys")
                admin.fill("#create-key input[name=user]", "carol")
                admin.click("#create-key button[type=submit]")
                expect(admin.locator("#new-secret")).to_be_visible()
                admin.goto(srv.url + "/console/audit?user=alice@example.com")
                expect(admin.locator("table.audit tbody tr")).to_have_count(1)
                expect(admin.locator("table.audit tbody tr")).to_contain_text("/v1/admin/keys")

                admin.click("form.logout button")
                expect(admin).to_have_url(srv.url + "/console/login")
                admin.goto(srv.url + "/console")
                assert admin.url.endswith("/console/login")
                assert not problems, problems

                user = browser.new_context().new_page()
                user.set_default_timeout(TIMEOUT_MS)
                sign_in(user, srv.url, "bob")
                expect(user.locator("h1")).to_have_text("Admins only")
                expect(user.locator(".error")).to_contain_text("bob@example.com")
                user.goto(srv.url + "/console")
                assert user.url.endswith("/console/login")
            finally:
                browser.close()
        # the API served all along
        assert httpx.get(srv.url + "/ready", timeout=5).status_code == 200
    finally:
        if idp is not None:
            idp.stop()
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def sign_in(page, url: str, account: str) -> None:
    """From the console's login page through the provider's login and consent pages."""
    page.goto(url + "/console")
    assert page.url.endswith("/console/login")
    page.click("text=Log in with SSO")
    page.fill("input[name=login]", account)
    page.fill("input[name=password]", "any password")
    page.click("button[type=submit]")
    page.click("button:has-text('Continue')")
