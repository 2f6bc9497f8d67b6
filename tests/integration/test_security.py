"""The perimeter (issue 3): a JWT attack suite, object-level authorization, rate limits,
body limits and security events — against the real intake over HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from schemas import samples
from tests.conftest import Pipeline, PipelineFactory
from tests.jwt_attacks import Keys, attacks

pytestmark = pytest.mark.integration


@pytest.fixture
async def secured(pipeline_factory: PipelineFactory, tmp_path: Path) -> tuple[Pipeline, Keys]:
    keys = Keys(tmp_path)
    pipe: Pipeline = await pipeline_factory(
        worker=False,
        jwks_url=str(keys.path),
        desk_rate_limits="flood-desk=2:3",
        max_body_bytes=32 * 1024,
    )
    return pipe, keys


async def post_with(pipe: Pipeline, token: str) -> httpx.Response:
    run = samples.run_id()
    async with httpx.AsyncClient(base_url=pipe.intake.url, timeout=10) as client:
        return await client.post(
            "/v1/settlements/sync",
            json=samples.otc_confirmation(run, "OTC-SEC-0001"),
            headers={"Authorization": f"Bearer {token}", "X-Settlement-Run-ID": run},
        )


async def test_every_allowed_algorithm_is_accepted(secured: tuple[Pipeline, Keys]) -> None:
    pipe, keys = secured
    for alg, kid in (("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")):
        response = await post_with(pipe, keys.token(alg, kid))
        assert response.status_code in (202, 409), (alg, response.text)


async def test_jwt_attack_suite_every_attack_is_401(secured: tuple[Pipeline, Keys]) -> None:
    pipe, keys = secured
    results = {}
    for name, token in attacks(keys).items():
        response = await post_with(pipe, token)
        results[name] = response.status_code
        if response.status_code == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
    print("jwt-attack-results", json.dumps(results))  # quoted in the security review
    allowed = {
        name: status
        for name, status in results.items()
        if status != 401 and not (name == "oversized" and status == 431)
    }
    assert allowed == {}, f"attacks not refused: {allowed}"


async def test_rate_limit_per_desk(secured: tuple[Pipeline, Keys]) -> None:
    pipe, keys = secured
    flood = keys.token(desk="flood-desk", scope="settlements:read")
    calm = keys.token(desk="calm-desk", scope="settlements:read")
    statuses = []
    async with httpx.AsyncClient(base_url=pipe.intake.url, timeout=10) as client:
        for _ in range(8):
            response = await client.get(
                "/v1/batches/batch_none", headers={"Authorization": f"Bearer {flood}"}
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
            other = await client.get(
                "/v1/batches/batch_none", headers={"Authorization": f"Bearer {calm}"}
            )
            assert other.status_code == 404  # the other desk is never throttled
    assert statuses[:3] == [404, 404, 404]
    assert 429 in statuses[3:]


async def test_body_limit_on_every_route(secured: tuple[Pipeline, Keys]) -> None:
    pipe, keys = secured
    ops = keys.token(desk="ops", scope="ops:replay")
    async with httpx.AsyncClient(base_url=pipe.intake.url, timeout=10) as client:
        response = await client.post(
            "/v1/reconciliation/replay",
            headers={"Authorization": f"Bearer {ops}"},
            json={"message_ids": ["x" * 60] * 1000, "reason": "big"},
        )
    assert response.status_code == 413


async def test_object_level_authorization(secured: tuple[Pipeline, Keys]) -> None:
    pipe, keys = secured
    run = samples.run_id()
    async with httpx.AsyncClient(base_url=pipe.intake.url, timeout=10) as client:
        east = {"Authorization": f"Bearer {keys.token(desk='power-east')}"}
        west = {"Authorization": f"Bearer {keys.token(desk='gas-west')}"}
        accepted = await submit_batch_with(client, east, run)
        batch_url = accepted.json()["status_url"]
        message_url = f"/v1/settlements/{accepted.json()['messages'][0]['message_id']}"
        assert (await client.get(batch_url, headers=west)).status_code == 404
        assert (await client.get(message_url, headers=west)).status_code == 404
        for path in ("/v1/reconciliation", "/v1/holds"):
            assert (await client.get(path, headers=east)).status_code == 403
        assert (
            await client.post("/v1/holds/hold_x/release", headers=east, json={"reason": "x"})
        ).status_code == 403
        limited = {"Authorization": f"Bearer {keys.token(contracts=['OTC-EAST-*'])}"}
        assert (await client.get(message_url, headers=limited)).status_code == 404
        scope_matrix = {
            "settlements:read": {"GET " + batch_url: 200, "GET /v1/holds": 403},
            "ops:read": {
                "GET /v1/holds": 200,
                "GET /v1/reconciliation": 200,
                "GET " + batch_url: 403,
            },
            "ops:holds": {"GET /v1/holds": 403},
            "audit:read": {"GET /v1/holds": 403, "GET " + batch_url: 403},
        }
        for scope, expectations in scope_matrix.items():
            headers = {"Authorization": f"Bearer {keys.token(desk='power-east', scope=scope)}"}
            for call, expected in expectations.items():
                method, path = call.split(" ", 1)
                status = (await client.request(method, path, headers=headers)).status_code
                assert status == expected, (scope, call, status)


async def submit_batch_with(
    client: httpx.AsyncClient, headers: dict[str, str], run: str
) -> httpx.Response:
    response = await client.post(
        "/v1/settlements/batches",
        json={"records": [samples.otc_confirmation(run, "OTC-OLA-0001")]},
        headers={**headers, "X-Settlement-Run-ID": run, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert response.status_code == 202, response.text
    return response


async def test_repeated_failures_raise_a_security_alert(
    secured: tuple[Pipeline, Keys], capsys: pytest.CaptureFixture[str]
) -> None:
    pipe, _ = secured
    for _ in range(12):
        await post_with(pipe, "not-a-token")
    output = capsys.readouterr()
    text = output.out + output.err
    assert "security_alert" in text
    assert "repeated_authentication_failures" in text
    assert "not-a-token" not in text  # the presented credential is never logged


async def test_jwks_from_url_rotation_and_cooldown(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    """Keys come from the identity provider's JWKS URL; a rotated key is picked up, and a
    flood of unknown kids cannot make every request fetch the JWKS."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.conftest import Server

    keys = Keys(tmp_path)
    served = json.loads(keys.path.read_text())
    fetches = 0

    async def jwks(_: Request) -> JSONResponse:
        nonlocal fetches
        fetches += 1
        return JSONResponse(served)

    idp = await Server(Starlette(routes=[Route("/jwks.json", jwks)])).start()
    try:
        pipe: Pipeline = await pipeline_factory(
            worker=False, jwks_url=f"{idp.url}/jwks.json", jwks_refresh_cooldown_s=1.0
        )
        assert (await post_with(pipe, keys.token())).status_code == 202
        before = fetches
        for _ in range(20):
            assert (await post_with(pipe, keys.token(kid="forged-kid"))).status_code == 401
        assert fetches - before <= 1, "unknown kids must not hammer the identity provider"

        rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(rotated.public_key()))
        jwk.update(kid="rsa-2", alg="RS256", use="sig")
        served["keys"].append(jwk)
        await asyncio.sleep(1.1)  # past the cooldown
        assert (await post_with(pipe, keys.token(key=rotated, kid="rsa-2"))).status_code in (
            202,
            409,
        )
    finally:
        await idp.stop()
