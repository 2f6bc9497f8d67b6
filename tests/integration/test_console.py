"""The operations console (/console) on the real pipeline: OpenID Connect sign-in with PKCE
against the development identity provider, the cookies' and forms' defences, and — in a real
headless Chromium (Debian's package, driven by Selenium) — sign-in, search, a replay requested
by one operator and approved by another, and a hold released. Screenshots go to
`test-artifacts/console/` (or ETRM_SCREENSHOT_DIR)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ops.dev.idp import DEV_OPERATORS, IdpConfig, create_idp
from ops.dev.stack import free_port
from schemas import samples
from tests.conftest import Infra, Pipeline, PipelineFactory, Server, submit_batch
from tests.jwt_attacks import AUDIENCE, ISSUER
from tests.support import wait_for

pytestmark = pytest.mark.integration
CLIENT_ID = "etrm-console"
SHOTS = Path(os.environ.get("ETRM_SCREENSHOT_DIR", "test-artifacts/console"))


@dataclass
class ConsoleStack:
    pipe: Pipeline
    idp: Server
    base: str


@pytest.fixture
async def console(infra: Infra, pipeline_factory: PipelineFactory) -> AsyncIterator[ConsoleStack]:
    # The intake's port is fixed first: the redirect URI registered at the identity provider
    # names it, and the intake's settings name the identity provider.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = IdpConfig(
        issuer="",
        client_id=CLIENT_ID,
        redirect_uris=[f"{base}/console/callback"],
        private_key=infra.private_key,
        jwks=infra.jwks,
        api_issuer=ISSUER,
        api_audience=AUDIENCE,
        users={**DEV_OPERATORS, "trader-1": ("power-east", ["settlements:read"])},
    )
    idp = Server(create_idp(config))
    config.issuer = idp.url
    await idp.start()
    try:
        pipe: Pipeline = await pipeline_factory(
            sim={"reject_contracts": ["REJECT-*"], "drift_contracts": ["DRIFT-*"]},
            intake_config={"port": port},
            public_base_url=base,
            oidc_issuer=idp.url,
            oidc_client_id=CLIENT_ID,
            replay_approval_threshold=0,  # every replay waits for a second operator
            upstream_max_attempts=2,
        )
        yield ConsoleStack(pipe, idp, base)
    finally:
        await idp.stop()


# -- sign-in and the cookies, by HTTP ---------------------------------------------------------


def _cookie(response: httpx.Response, name: str) -> tuple[str, str]:
    """(value, attributes) of a Set-Cookie (httpx's jar would not keep a Secure cookie on
    http://, as a browser on 127.0.0.1 does)."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            value, _, attributes = header.partition(";")
            return value.split("=", 1)[1], attributes
    raise AssertionError(f"no {name} cookie in {response.headers}")


@dataclass
class Authorized:
    """A browser's state after the identity provider redirected back, before the callback."""

    http: httpx.AsyncClient
    login_cookie: str
    answer: dict[str, str]  # the code and state the identity provider sent back


async def _authorize(stack: ConsoleStack, user: str) -> Authorized:
    """Start a sign-in at the console and pick `user` at the identity provider, as a browser
    would (the cookies by hand)."""
    http = httpx.AsyncClient(base_url=stack.base, timeout=10)
    stack.pipe.clients.append(http)
    start = await http.get("/console/login", params={"next": "/console"})
    assert start.status_code == 303
    login_cookie, _ = _cookie(start, "etrm_console_login")
    query = {k: v[0] for k, v in parse_qs(urlsplit(start.headers["location"]).query).items()}
    fields = ("client_id", "redirect_uri", "state", "nonce", "code_challenge", "scope")
    picked = await http.post(
        f"{stack.idp.url}/authorize", data={**{k: query[k] for k in fields}, "user": user}
    )
    assert picked.status_code == 303, picked.text
    back = parse_qs(urlsplit(picked.headers["location"]).query)
    return Authorized(http, login_cookie, {k: v[0] for k, v in back.items()})


async def _callback(auth: Authorized) -> httpx.Response:
    return await auth.http.get(
        "/console/callback",
        params=auth.answer,
        headers={"Cookie": f"etrm_console_login={auth.login_cookie}"},
    )


async def _sign_in(stack: ConsoleStack, user: str) -> tuple[httpx.AsyncClient, str]:
    """A signed-in client and its session cookie."""
    auth = await _authorize(stack, user)
    done = await _callback(auth)
    assert done.status_code == 200, done.text
    session, _ = _cookie(done, "etrm_console")
    return auth.http, session


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


async def test_console_is_off_without_an_identity_provider(pipeline: Pipeline) -> None:
    async with httpx.AsyncClient(base_url=pipeline.intake.url) as http:
        answer = await http.get("/console")
    assert answer.status_code == 404
    assert answer.json()["code"] == "console_off"


async def test_sign_in_is_authorization_code_with_pkce_and_strict_cookies(
    console: ConsoleStack,
) -> None:
    http = httpx.AsyncClient(base_url=console.base, timeout=10)
    console.pipe.clients.append(http)
    first = await http.get("/console/holds")
    assert first.status_code == 303
    assert first.headers["location"] == "/console/login?next=%2Fconsole%2Fholds"
    start = await http.get(first.headers["location"])
    assert start.status_code == 303
    target = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert f"{target.scheme}://{target.netloc}" == console.idp.url
    assert query["response_type"] == "code"
    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == f"{console.base}/console/callback"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert query["state"]
    assert query["nonce"]
    _, attributes = _cookie(start, "etrm_console_login")
    assert {"HttpOnly", "Secure", "SameSite=Lax", "Path=/console"} <= {
        a.strip() for a in attributes.split(";")
    }

    client, session = await _sign_in(console, "ops-alice")
    _, attributes = _cookie(await _callback(await _authorize(console, "ops-alice")), "etrm_console")
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/console"} <= {
        a.strip() for a in attributes.split(";")
    }
    page = await client.get("/console", headers={"Cookie": f"etrm_console={session}"})
    assert page.status_code == 200
    assert 'id="signed-in-as">ops-alice<' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    # The cookie is sealed: a flipped character is no session at all.
    forged = session[:-2] + ("A" if session[-2] != "A" else "B") + session[-1]
    refused = await client.get("/console", headers={"Cookie": f"etrm_console={forged}"})
    assert refused.status_code == 303
    assert refused.headers["location"].startswith("/console/login")


async def test_a_forged_state_a_reused_code_and_a_foreign_sign_in_are_refused(
    console: ConsoleStack,
) -> None:
    auth = await _authorize(console, "ops-alice")
    http, answer = auth.http, auth.answer
    cookie = {"Cookie": f"etrm_console_login={auth.login_cookie}"}
    # CSRF on sign-in: a code delivered with another sign-in's state is not redeemed.
    wrong = await http.get(
        "/console/callback", params={"code": answer["code"], "state": "x" * 32}, headers=cookie
    )
    assert wrong.status_code == 401
    assert "state does not match" in wrong.text
    # Without the sign-in cookie (a link sent by an attacker) nothing is redeemed either.
    stray = await http.get("/console/callback", params=answer)
    assert stray.status_code == 400
    good = await http.get("/console/callback", params=answer, headers=cookie)
    assert good.status_code == 200
    # The identity provider redeems a code once.
    again = await http.get("/console/callback", params=answer, headers=cookie)
    assert again.status_code == 401
    assert "refused the code" in again.text
    # A desk's user signs in but is not an operator: the console is not theirs.
    desk, session = await _sign_in(console, "trader-1")
    page = await desk.get("/console", headers={"Cookie": f"etrm_console={session}"})
    assert page.status_code == 403
    assert "ops:read" in page.text


async def test_forms_need_the_session_token_the_same_origin_and_the_scope(
    console: ConsoleStack,
) -> None:
    client, session = await _sign_in(console, "ops-viewer")
    cookie = {"Cookie": f"etrm_console={session}"}
    page = await client.get("/console/holds", headers=cookie)
    token = _csrf(page)
    form = {"scope": "selected", "message_id": "m-1", "reason": "r"}
    missing = await client.post("/console/reconciliation/preview", data=form, headers=cookie)
    assert missing.status_code == 403
    assert "security token" in missing.text
    foreign = await client.post(
        "/console/reconciliation/preview",
        data={**form, "csrf": token},
        headers={**cookie, "Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    assert "another site" in foreign.text
    viewer = await client.post(
        "/console/reconciliation/preview", data={**form, "csrf": token}, headers=cookie
    )
    assert viewer.status_code == 403
    assert "ops:replay" in viewer.text
    # No session: a form post is refused, not redirected into a sign-in that would replay it.
    anonymous = await client.post("/console/reconciliation/preview", data={**form, "csrf": token})
    assert anonymous.status_code == 401


async def test_the_queue_filter_offers_the_reasons_and_names_a_misspelt_one(
    console: ConsoleStack,
) -> None:
    client, session = await _sign_in(console, "ops-viewer")
    cookie = {"Cookie": f"etrm_console={session}"}
    page = await client.get(
        "/console/reconciliation", params={"reason": "retries_exhausted"}, headers=cookie
    )
    assert page.status_code == 200
    assert '<select name="reason">' in page.text
    assert "<option selected>retries_exhausted</option>" in page.text
    for field, value in (("reason", "retries_exhaustd"), ("status", "opened")):
        wrong = await client.get("/console/reconciliation", params={field: value}, headers=cookie)
        assert wrong.status_code == 422
        assert f"{field}:" in wrong.text  # "Bad filter", naming the field
    by_http = await client.get("/console/reconciliation", params={"status": "422"}, headers=cookie)
    assert by_http.status_code == 200


async def test_a_requester_cannot_approve_their_own_replay(console: ConsoleStack) -> None:
    pipe = console.pipe
    desk = pipe.client(desk="power-east")
    run = samples.run_id()
    batch = await submit_batch(desk, run, [samples.otc_confirmation(run, "REJECT-0001")])
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    [message] = final["messages"]
    assert message["state"] == "dead_lettered"
    client, session = await _sign_in(console, "ops-alice")
    cookie = {"Cookie": f"etrm_console={session}"}
    token = _csrf(await client.get("/console", headers=cookie))
    requested = await client.post(
        "/console/replays",
        data={
            "csrf": token,
            "scope": "selected",
            "message_id": message["message_id"],
            "reason": "ETRM fixed the contract",
        },
        headers=cookie,
    )
    assert requested.status_code == 303
    replay_path = requested.headers["location"]
    page = await client.get(replay_path, headers=cookie)
    assert 'id="awaiting"' in page.text
    assert 'id="approve"' not in page.text
    own = await client.post(f"{replay_path}/approve", data={"csrf": token}, headers=cookie)
    assert own.status_code == 403
    assert "four eyes" in own.text


# -- the browser ------------------------------------------------------------------------------


def _browser() -> Any:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        if os.environ.get("ETRM_REQUIRE_TOOLS"):
            pytest.fail("chromium is required here (apt-get install chromium chromium-driver)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


class Browser:
    """Selenium is synchronous: every step runs in a thread, so the servers in this event loop
    keep answering."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def __call__(self, step: Callable[[Any], Any]) -> Any:
        return await asyncio.to_thread(step, self.driver)

    async def wait_for(self, css: str, text: str | None = None, timeout: float = 30.0) -> str:
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:

            def look(d: Any) -> str | None:
                try:
                    found = d.find_elements(By.CSS_SELECTOR, css)
                    return str(found[0].text) if found else None
                except WebDriverException:  # a live page reloaded under us: look again
                    return None

            seen = await self(look)
            if seen is not None and (text is None or text in seen):
                return str(seen)
            last = seen or ""
            await asyncio.sleep(0.2)
        url = await self(lambda d: d.current_url)
        raise AssertionError(f"{css!r} with {text!r} not shown at {url} (last: {last!r})")

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        await self(lambda d: d.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        await self(lambda d: d.find_element(By.CSS_SELECTOR, css).send_keys(text))

    async def shot(self, name: str) -> None:
        def save(d: Any) -> None:
            SHOTS.mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(SHOTS / f"{name}.png"))

        await self(save)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    driver = await asyncio.to_thread(_browser)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)


async def test_browser_sign_in_search_replay_with_approval_and_hold_release(
    console: ConsoleStack, browser: Browser
) -> None:
    pipe = console.pipe
    desk = pipe.client(desk="power-east")
    run = samples.run_id()
    records = [
        samples.otc_confirmation(run, "OK-000001"),
        samples.otc_confirmation(run, "REJECT-0001"),
        samples.otc_confirmation(run, "REJECT-0002"),
        samples.iso_award(run, "DRIFT-00001"),
    ]
    batch = await submit_batch(desk, run, records)
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    ids = [m["message_id"] for m in final["messages"]]
    assert [m["state"] for m in final["messages"]] == [
        "delivered",
        "dead_lettered",
        "dead_lettered",
        "held",
    ]

    # Alice signs in (the dev identity provider's one-click page), sees the overview.
    await browser(lambda d: d.get(f"{console.base}/console"))
    await browser.wait_for("#sign-in-ops-alice")
    await browser.click("#sign-in-ops-alice")
    await browser.wait_for("#open-dead-letters", "2")
    assert await browser.wait_for("#signed-in-as") == "ops-alice"
    await browser.shot("overview")

    # Search by message id lands on the record's history.
    await browser.type("header input[name=q]", ids[0])
    await browser.click("header form.search button")
    await browser.wait_for("#message-state", "delivered")
    await browser.wait_for("#audit", "delivered")
    await browser.shot("message")

    # The reconciliation queue: tick the two dead letters, preview, request with a reason.
    await browser(lambda d: d.get(f"{console.base}/console/reconciliation?status=open"))
    await browser.wait_for("#dead-letters", ids[1])
    for message_id in ids[1:3]:
        await browser.click(f"input[type=checkbox][value='{message_id}']")
    await browser.shot("reconciliation")
    await browser.click("#preview-selected")
    await browser.wait_for("#preview-count", "2 record(s) would be replayed")
    await browser.type("#replay-reason", "ETRM fixed the contract mapping")
    await browser.click("#request-replay")
    await browser.wait_for("#awaiting")
    assert await browser.wait_for("#replay-state") == "pending_approval"
    replay_url = await browser(lambda d: d.current_url)
    await browser.shot("replay-awaiting-approval")

    pipe.sim.config.reject_contracts = []  # the ETRM side is fixed
    # Bob signs in and approves; the page follows the replay live.
    await browser.click("header form.who button")
    await browser.wait_for("#signed-out")
    await browser(lambda d: d.get(replay_url))
    await browser.wait_for("#sign-in-ops-bob")
    await browser.click("#sign-in-ops-bob")
    await browser.wait_for("#approve")
    await browser.type("#approve-form input[name=reason]", "checked with the desk")
    await browser.click("#approve")
    await browser.wait_for("#replay-state", "completed", timeout=60)
    await browser.wait_for("#outcome", "delivered 2", timeout=60)
    assert await browser.wait_for("#approved-by") == "ops-bob"
    await browser.shot("replay-approved")

    # The drift hold: released with a reason.
    await browser(lambda d: d.get(f"{console.base}/console/holds"))
    await browser.wait_for("#holds", "DRIFT-00001")
    await browser.type("#holds form[action$='/release'] input[name=reason]", "ISO confirmed")
    await browser.click("#holds button.release")
    await browser.wait_for("#holds", "No holds.")
    await browser.shot("holds")

    # What the browser did is what the ledger and the upstream say: the replayed records
    # delivered once each, the hold released, and the audit names both operators.
    batch_id = batch.json()["batch_id"]

    async def settled() -> bool:
        now = (await desk.get(f"/v1/batches/{batch_id}")).json()
        return [m["state"] for m in now["messages"]] == [
            "delivered",
            "delivered",
            "delivered",
            "released",
        ]

    await wait_for(settled, timeout=30)
    # One POST for each record that took effect first time; two for each replayed one (the
    # 422 that dead-lettered it, then the replay's), never a second effect.
    assert sorted(pipe.sim.posts_by_key[k] for k in pipe.sim.by_key) == [1, 1, 2, 2]
    keys = [e.idempotency_key for e in pipe.sim.effects]
    assert len(keys) == len(set(keys)) == 4
    replay_id = replay_url.rsplit("/", 1)[1]
    job = (await pipe.operator().get(f"/v1/reconciliation/replay/{replay_id}")).json()
    assert (job["requested_by"], job["approved_by"], job["state"]) == (
        "ops-alice",
        "ops-bob",
        "completed",
    )
