"""The router's console in a real headless Chromium (Playwright) against a real `llmhost
router` in front of two real `llmhost serve` replicas: a wrong token is refused, the admin
logs in, sees both replicas healthy with their model, takes one out of rotation from the page
(traffic then goes only to the other), watches the request chart fill as traffic flows, and
logs out; the browser reports no Content-Security-Policy violation on the way."""

from __future__ import annotations

import httpx

from tests.conftest import require, require_exe
from tests.e2e.conftest import watched_page
from tests.e2e.test_router import TOKEN, Router, fakes  # noqa: F401  (fakes: a fixture)

TIMEOUT_MS = 30_000


def test_router_console_in_a_browser(fakes, tmp_path):  # noqa: F811
    chromium = require_exe("chromium", "chromium")
    require("playwright")
    from playwright.sync_api import expect, sync_playwright

    a, b = fakes
    router = Router(tmp_path, f"blue={a.url}", f"green={b.url}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page, problems = watched_page(browser, TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                drive(page, expect, router)
                assert not [t for t in problems if "Content Security Policy" in t], problems
            finally:
                browser.close()
    finally:
        router.stop()


def drive(page, expect, router: Router) -> None:
    url = router.url
    page.goto(url + "/console")
    assert page.url.endswith("/console/login")
    expect(page.locator("label[for=key]")).to_have_text("Router admin token")
    page.fill("#key", "wrong-token")
    page.click("form.login button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not the router's admin token")
    page.fill("#key", TOKEN)
    page.click("form.login button[type=submit]")
    expect(page).to_have_url(url + "/console")

    for name in ("blue", "green"):
        row = page.locator(f"tr[data-upstream={name}]")
        expect(row.locator(".state")).to_have_text("healthy")
    expect(page.locator("table.models tbody tr")).to_have_count(1)
    expect(page.locator("table.models tbody tr td").nth(2)).to_have_text("2 of 2")

    # green out of rotation from the page: every request now goes to blue
    green = page.locator("tr[data-upstream=green]")
    green.locator("input[name=weight]").fill("0")
    green.get_by_role("button", name="Set").click()
    expect(page.locator(".flash")).to_contain_text("green now takes weight 0")
    with httpx.Client(base_url=url, timeout=30) as c:
        went = {
            c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).headers[
                "x-llmhost-upstream"
            ]
            for _ in range(12)
        }
    assert went == {"blue"}

    # the live part refreshes (our script) and the request chart has drawn the traffic
    expect(page.locator("tr[data-upstream=blue] td").nth(4)).to_have_text("12")
    expect(page.locator("figure.chart[data-chart=requests] polyline")).to_have_count(1)
    expect(page.locator("table.models tbody tr td").nth(2)).to_have_text("1 of 2")

    page.click("form.logout button[type=submit]")
    expect(page).to_have_url(url + "/console/login")
    page.goto(url + "/console")
    assert page.url.endswith("/console/login")
