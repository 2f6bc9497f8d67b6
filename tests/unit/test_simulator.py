"""The ETRM simulator's sync endpoint (ops.dev.simulator `SyncEndpoint`), answered on ASGI
ahead of FastAPI: every answer of CONTRACT §4 it gives, with its status, body and headers, and
its counts per Idempotency-Key — over httptools as `mock-etrm` serves it, and in memory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import httpx

from ops.dev.simulator import Script, SimConfig, SyncEndpoint, create_simulator
from tests.conftest import Server

RECORD = b'{"contract_id":"OTC-1","position_mwh":"10.000","revision":1,"settlement_run_id":"r"}'


SIGNING = "sig"  # the simulator's signing secret in these tests (not a real one)


def _signed(body: bytes) -> str:
    t = str(int(time.time()))
    mac = hmac.new(SIGNING.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


async def _token(http: httpx.AsyncClient) -> str:
    basic = base64.b64encode(b"c:s").decode()
    answer = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert answer.status_code == 200
    return str(answer.json()["access_token"])


async def _post(
    http: httpx.AsyncClient, token: str, key: str | None, body: bytes = RECORD, **extra: str
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Signature": _signed(body), **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await http.post("/api/v1/settlements/sync", content=body, headers=headers)


async def _every_answer(http: httpx.AsyncClient, sim: Any) -> None:
    token = await _token(http)
    assert (await _post(http, "not-a-token", "k-0")).status_code == 401
    bad = await http.post(
        "/api/v1/settlements/sync",
        content=RECORD,
        headers={"Authorization": f"Bearer {token}", "X-Signature": _signed(b"other")},
    )
    assert (bad.status_code, bad.json()) == (400, {"error": "bad X-Signature"})
    assert (await _post(http, token, None)).status_code == 400
    assert (await _post(http, token, "k-x", b"not json")).status_code == 400

    first = await _post(http, token, "k-1")
    assert first.status_code == 201
    assert first.headers["content-type"] == "application/json"
    taken = first.json()
    assert taken["reconciled_position_mwh"] == "10.000"
    again = await _post(http, token, "k-1")
    assert (again.status_code, again.json()) == (200, {"transaction_id": taken["transaction_id"]})

    sim.config.outage, sim.config.retry_after_s = True, 7
    down = await _post(http, token, "k-2")
    assert (down.status_code, down.headers["retry-after"]) == (503, "7")
    sim.config.outage, sim.config.retry_after_s = False, None

    sim.config.scripts = [Script("OTC-*", 202, b"\x00 not json", headers={"X-Odd": "1"})]
    odd = await _post(http, token, "k-3")
    assert (odd.status_code, odd.content, odd.headers["x-odd"]) == (202, b"\x00 not json", "1")
    sim.config.scripts = []

    sim.config.reject_contracts = ["OTC-*"]
    assert (await _post(http, token, "k-4")).status_code == 422
    sim.config.reject_contracts = []

    # counted per key, duplicates apart from effects
    assert sim.posts_by_key["k-1"] == 2
    assert [e.idempotency_key for e in sim.effects] == ["k-1"]
    assert sim.duplicate_posts == 1
    # everything else still reaches the FastAPI app
    stats = (await http.get("/_sim/stats")).json()
    assert stats["effects"] == 1
    assert stats["posts"] == sim.posts
    assert (await http.get("/api/v1/settlements/sync")).status_code == 405


async def test_every_answer_over_httptools_as_mock_etrm_serves_it() -> None:
    app = create_simulator(SimConfig(client_id="c", client_secret="s", signing_secret=SIGNING))
    # ahead of FastAPI's routing
    assert [getattr(m, "cls", None) for m in app.user_middleware] == [SyncEndpoint]
    server = Server(app, http="httptools")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
            await _every_answer(http, app.state.sim)
    finally:
        await server.stop()


async def test_every_answer_in_memory() -> None:
    app = create_simulator(SimConfig(client_id="c", client_secret="s", signing_secret=SIGNING))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        await _every_answer(http, app.state.sim)
