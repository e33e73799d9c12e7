"""The console in a real headless Chromium (Playwright) against a real `llmhost serve` (tiny
real model, authentication on): a wrong key is refused, the admin logs in, sees the model,
unloads and loads it, watches the live part refresh, finds a user's request in the audit
page and checks the chain, chats in the playground with the answer streamed, and logs out;
the browser reports no Content-Security-Policy violation on the way."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import httpx

from llmhost.security.auth import KeyStore
from tests.conftest import require, require_exe
from tests.e2e.conftest import Server, watched_page

TIMEOUT_MS = 60_000


def test_console_in_a_browser(tiny_model, tmp_path):
    chromium = require_exe("chromium", "chromium")
    require("playwright")
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    keys = KeyStore(home / "keys.db")
    admin, _ = keys.create("root", "admin")
    user, _ = keys.create("bob", "user")
    keys.close()
    srv = Server(home, str(tiny_model.gguf), "--ctx-size", "512", auth=True)
    try:
        srv.wait_ready()
        (model,) = [
            m["id"]
            for m in httpx.get(
                srv.url + "/v1/models", headers={"Authorization": f"Bearer {admin}"}
            ).json()["data"]
        ]
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            headers={"Authorization": f"Bearer {user}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page, problems = watched_page(browser, TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                drive(page, expect, srv.url, admin, model)
                assert not [t for t in problems if "Content Security Policy" in t], problems
                # the errors expected: the wrong key's 401 and the refused playground turn
                assert len(problems) == 2, problems
                assert "/console/login: " in problems[0], problems
                assert "/console/playground/chat: " in problems[1], problems
            finally:
                browser.close()
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def drive(page, expect, url: str, admin: str, model: str) -> None:
    # login: a wrong key first
    page.goto(url + "/console")
    assert page.url.endswith("/console/login")
    page.fill("#key", "llmh_wrong_key")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not valid")
    page.fill("#key", admin)
    page.click("form.login button[type=submit]")
    expect(page).to_have_url(url + "/console")
    row = page.locator("tr[data-model]", has_text=model)
    expect(row.locator(".state")).to_have_text("loaded")

    # unload, then load again: the live part shows the state as it changes
    row.get_by_role("button", name="Unload").click()
    expect(page.locator(".flash")).to_contain_text("Unloaded")
    expect(row.locator(".state")).to_have_text("unloaded")
    row.get_by_role("button", name="Load").click()
    expect(row.locator(".state")).to_have_text("loaded")

    # the live part is swapped in by our script, charts included
    expect(page.locator("#live")).to_have_attribute("data-refreshed", re.compile(r"\d+"))
    expect(page.locator("figure.chart svg")).to_have_count(5)

    # the user's request is in the audit log; the chain checks out
    page.click("nav >> text=Audit")
    page.fill("input[name=user]", "bob")
    page.click("form.search button[type=submit]")
    expect(page.locator("table.audit tbody tr")).to_have_count(1)
    expect(page.locator("table.audit tbody tr")).to_contain_text("/v1/chat/completions")
    page.click("text=Check the chain now")
    expect(page.locator("#chain-state")).to_contain_text("Intact")

    # and counted in the usage, per user, with a CSV of the same
    page.click("nav >> text=Usage")
    page.select_option("select[name=group_by]", "user")
    page.click("form.search button[type=submit]")
    bob = page.locator("table.usage tbody tr", has_text="bob")
    expect(bob).to_have_count(1)
    expect(bob.locator("td").nth(1)).to_have_text("1")
    with page.expect_download() as download:
        page.click("#csv")
    csv_text = Path(download.value.path()).read_text()
    assert csv_text.splitlines()[0].startswith("user,requests") and "\nbob,1," in csv_text

    # a key is made (its secret shown once, and working), then revoked
    page.click("nav >> text=Keys")
    page.fill("#create-key input[name=user]", "dave")
    page.fill("#create-key input[name=tokens_per_day]", "5000")
    page.click("#create-key button[type=submit]")
    secret = page.locator("#new-secret").inner_text()
    auth = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
    dave = page.locator("table.keys tbody tr", has_text="dave")
    expect(dave.locator(".state")).to_have_text("active")
    dave.get_by_role("button", name="Revoke").click()
    expect(page.locator("table.keys tbody tr", has_text="dave").locator(".state")).to_have_text(
        "revoked"
    )
    assert httpx.get(url + "/v1/models", headers=auth).status_code == 401

    # the playground: a temperature out of range is stopped by the form; the one given is
    # sent (greedy here, so that there is an answer), and the answer streams and is measured
    page.click("nav >> text=Playground")
    page.select_option("#model", model)
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "3")
    page.fill("#message", "Hello there")
    page.click("#send")
    assert page.locator("#temperature").evaluate("e => e.validity.rangeOverflow")
    expect(page.locator(".msg")).to_have_count(0)
    page.fill("#temperature", "0")
    # a turn the API refuses stays out of the conversation sent next
    refusal = {"error": {"message": "refused here", "type": "invalid_request_error"}}
    page.route(
        "**/console/playground/chat",
        lambda route: route.fulfill(status=400, json=refusal),
        times=1,
    )
    page.click("#send")
    expect(page.locator("#status")).to_have_text("error: refused here")
    expect(page.locator(".msg.assistant.failed")).to_have_count(1)
    page.fill("#message", "Hello there")
    with page.expect_request("**/console/playground/chat") as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["temperature"] == 0 and body["max_tokens"] == 16, body
    assert body["messages"] == [{"role": "user", "content": "Hello there"}], body
    expect(page.locator("#status")).to_have_text("done")
    answer = page.locator(".msg.assistant:not(.failed) span").inner_text()
    assert answer.strip(), answer
    assert float(page.locator("#ttft").inner_text()) >= 0
    # tokens/s from the server's times: the page gets this fast model's 16 tokens in a read
    # or two and, timing them itself, showed rates in the hundreds of thousands
    assert 0 < float(page.locator("#tps").inner_text()) < 100_000
    assert int(page.locator("#tokens").inner_text()) > 0

    # the playground's request is audited under the admin's name
    # (the key made and revoked above are records of root's too, with no model)
    page.goto(url + "/console/audit?user=root&model=" + quote(model))
    expect(page.locator("table.audit tbody tr")).to_have_count(1)
    page.goto(url + "/console/audit?user=root")
    expect(page.locator("table.audit tbody tr")).to_have_count(3)

    # the sessions page lists this login, as the admin's own
    page.click("nav >> text=Sessions")
    mine = page.locator("table.sessions tbody tr")
    expect(mine).to_have_count(1)
    expect(mine).to_contain_text("root")
    expect(mine.locator(".tag")).to_have_text("you")

    # logging out ends the session
    page.click("form.logout button")
    expect(page).to_have_url(url + "/console/login")
    page.goto(url + "/console")
    assert page.url.endswith("/console/login")
