"""The intake's contract (CONTRACT §3, §6): status codes, problem details, access rules."""

from __future__ import annotations

import uuid

import httpx
import pytest

from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch

pytestmark = pytest.mark.integration


@pytest.fixture
async def intake_only(pipeline_factory: PipelineFactory) -> Pipeline:
    pipe: Pipeline = await pipeline_factory(worker=False, max_body_bytes=64 * 1024)
    return pipe


def _bare(pipe: Pipeline, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=pipe.intake.url, headers=headers or {}, timeout=10)
    pipe.clients.append(client)
    return client


# -- authentication and authorization ----------------------------------------------------------


async def test_missing_expired_and_wrong_audience_tokens_are_401(intake_only: Pipeline) -> None:
    pipe = intake_only
    run = samples.run_id()
    record = samples.otc_confirmation(run, "OTC-AUTH-001")
    expired = pipe.token(ttl_s=-120)
    wrong_aud = samples_token_with(pipe, audience="someone-else")
    for headers in (
        {},
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": f"Bearer {wrong_aud}"},
        {"Authorization": "Bearer not.a.jwt"},
    ):
        client = _bare(pipe, headers)
        response = await submit_batch(client, run, [record])
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"
        assert (await client.get("/v1/batches/whatever")).status_code == 401


def samples_token_with(pipe: Pipeline, **claims: str) -> str:
    from ops.dev.devkeys import mint_token
    from tests.jwt_attacks import ISSUER

    return mint_token(
        pipe.infra.private_key,
        issuer=claims.get("issuer", ISSUER),
        audience=claims["audience"],
        subject="t",
        desk="power-east",
        scopes=["settlements:write", "settlements:read"],
    )


async def test_missing_scope_is_403(intake_only: Pipeline) -> None:
    pipe = intake_only
    run = samples.run_id()
    reader = pipe.client(scopes="settlements:read")
    response = await submit_batch(reader, run, [samples.otc_confirmation(run, "OTC-SCOPE-01")])
    assert response.status_code == 403
    assert response.json()["required_scope"] == "settlements:write"
    writer = pipe.client(scopes="settlements:write")
    accepted = await submit_batch(writer, run, [samples.otc_confirmation(run, "OTC-SCOPE-01")])
    assert accepted.status_code == 202
    assert (await writer.get(accepted.json()["status_url"])).status_code == 403


async def test_another_desks_batch_and_message_are_404(intake_only: Pipeline) -> None:
    pipe = intake_only
    run = samples.run_id()
    east = pipe.client(desk="power-east")
    west = pipe.client(desk="gas-west")
    response = await submit_batch(east, run, [samples.otc_confirmation(run, "OTC-DESK-001")])
    assert response.status_code == 202
    batch_url = response.json()["status_url"]
    message_url = f"/v1/settlements/{response.json()['messages'][0]['message_id']}"
    assert (await east.get(batch_url)).status_code == 200
    assert (await west.get(batch_url)).status_code == 404
    assert (await west.get(message_url)).status_code == 404
    assert (await west.get("/v1/batches/batch_doesnotexist")).status_code == 404


async def test_desk_reads_are_planned_per_call_and_acceptance_keeps_cached_plans(
    intake_only: Pipeline,
) -> None:
    """The served intake reads batches and records for desks on its `custom_plans` engine
    (ledger.db.make_engine) and accepts on the other: a cached generic plan made while the
    tables were nearly empty is never what answers a desk's GET."""
    from ledger.acceptance import IntakeStore
    from ledger.db import fetch_direct

    pipe = intake_only
    run = samples.run_id()
    east = pipe.client(desk="power-east")
    response = await submit_batch(east, run, [samples.otc_confirmation(run, "OTC-PLAN-001")])
    assert (await east.get(response.json()["status_url"])).status_code == 200
    ledger = pipe.intake_services.ledger
    assert isinstance(ledger, IntakeStore)
    show = "SELECT current_setting('plan_cache_mode') AS mode"
    [reads] = await fetch_direct(ledger.reads, show, {})
    [writes] = await fetch_direct(ledger.engine, show, {})
    assert (reads["mode"], writes["mode"]) == ("force_custom_plan", "auto")


async def test_contract_patterns_and_trader_scope_header(intake_only: Pipeline) -> None:
    pipe = intake_only
    run = samples.run_id()
    limited = pipe.client(contracts=["OTC-EAST-*"])
    outside = await submit_batch(limited, run, [samples.otc_confirmation(run, "OTC-WEST-001")])
    assert outside.status_code == 403
    inside = await submit_batch(limited, run, [samples.otc_confirmation(run, "OTC-EAST-001")])
    assert inside.status_code == 202
    spoof = await limited.post(
        "/v1/settlements/sync",
        json=samples.otc_confirmation(run, "OTC-EAST-002"),
        headers={"X-Settlement-Run-ID": run, "X-Trader-Scope": "gas-west"},
    )
    assert spoof.status_code == 403


# -- validation and problem details -------------------------------------------------------------


async def test_schema_errors_name_record_index_and_field(intake_only: Pipeline) -> None:
    pipe = intake_only
    client = pipe.client()
    run = samples.run_id()
    good = samples.otc_confirmation(run, "OTC-VALID-01")
    bad = samples.iso_award(run, "PJM-BAD-0001", price="NaN")
    unknown = samples.otc_confirmation(run, "OTC-VALID-02") | {"nickname": "x"}
    response = await submit_batch(client, run, [good, bad, unknown], key="schema-key")
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    errors = {(e["index"], e["field"]) for e in problem["errors"]}
    assert (1, "clearing_price") in errors
    assert (2, "nickname") in errors
    # The key was not taken by the refused request: fixing the body and retrying works.
    fixed = await submit_batch(client, run, [good], key="schema-key")
    assert fixed.status_code == 202


async def test_a_market_day_past_9999_is_a_422_naming_it_in_a_single_record_and_a_batch(
    intake_only: Pipeline,
) -> None:
    """Its delivery period has no UTC instant: the date arithmetic overflowed into a 500."""
    client = intake_only.client()
    run = samples.run_id()
    award = samples.iso_award(run, "PJM-LATE-0001") | {"operating_day": "9999-12-31"}
    single = await client.post(
        "/v1/settlements/sync", json=award, headers={"X-Settlement-Run-ID": run}
    )
    assert single.status_code == 422, single.text
    assert [e["field"] for e in single.json()["errors"]] == ["operating_day"]
    nomination = samples.gas_nomination(run, "GAS-LATE-0001") | {"flow_date": "9999-12-31"}
    good = samples.otc_confirmation(run, "OTC-LATE-0001")
    batch = await submit_batch(client, run, [good, nomination], key="late-days")
    assert batch.status_code == 422, batch.text
    assert [(e["index"], e["field"]) for e in batch.json()["errors"]] == [(1, "flow_date")]


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda h, b: h.pop("X-Settlement-Run-ID"), 400),
        (lambda h, b: h.update({"X-Settlement-Run-ID": "lowercase0000000"}), 400),
        (lambda h, b: h.update({"X-Settlement-Run-ID": "AAAAAAAAAAAAAAAA"}), 400),
        (lambda h, b: h.pop("Idempotency-Key"), 400),
        (lambda h, b: h.update({"Content-Type": "text/plain"}), 415),
    ],
    ids=["no-run-id", "malformed-run-id", "run-id-mismatch", "no-idempotency-key", "not-json"],
)
async def test_header_errors(intake_only: Pipeline, mutate: object, status: int) -> None:
    pipe = intake_only
    client = pipe.client()
    run = samples.run_id()
    headers = {
        "X-Settlement-Run-ID": run,
        "Idempotency-Key": uuid.uuid4().hex,
        "Content-Type": "application/json",
    }
    body = (
        b'{"records": ['
        + httpx.Request("POST", "/", json=samples.otc_confirmation(run, "OTC-HEADER-1")).content
        + b"]}"
    )
    mutate(headers, body)  # type: ignore[operator]
    response = await client.post("/v1/settlements/batches", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["status"] == status


async def test_body_errors(intake_only: Pipeline) -> None:
    pipe = intake_only
    client = pipe.client()
    run = samples.run_id()
    headers = {
        "X-Settlement-Run-ID": run,
        "Idempotency-Key": "body-key",
        "Content-Type": "application/json",
    }
    post = client.post
    assert (
        await post("/v1/settlements/batches", content=b"{not json", headers=headers)
    ).status_code == 400
    duplicate = b'{"records": [], "records": []}'
    assert (
        await post("/v1/settlements/batches", content=duplicate, headers=headers)
    ).status_code == 422
    empty = await post("/v1/settlements/batches", json={"records": []}, headers=headers)
    assert empty.status_code == 422
    huge = b'{"records": [' + b" " * (70 * 1024) + b"]}"
    assert (await post("/v1/settlements/batches", content=huge, headers=headers)).status_code == 413


async def test_revision_conflict_and_key_reuse(intake_only: Pipeline) -> None:
    pipe = intake_only
    client = pipe.client()
    run = samples.run_id()
    first = samples.otc_confirmation(run, "OTC-CONFL-01", volume="100")
    changed = samples.otc_confirmation(run, "OTC-CONFL-01", volume="101")
    assert (await submit_batch(client, run, [first], key="k-conflict")).status_code == 202
    conflict = await submit_batch(client, run, [changed])
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "revision_conflict"
    reused = await submit_batch(
        client, run, [samples.otc_confirmation(run, "OTC-OTHER-01")], key="k-conflict"
    )
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"


async def test_single_record_sync(intake_only: Pipeline) -> None:
    pipe = intake_only
    client = pipe.client()
    run = samples.run_id()
    record = samples.canonical(run, "RT-SINGLE-01", price="-3.5")
    response = await client.post(
        "/v1/settlements/sync", json=record, headers={"X-Settlement-Run-ID": run}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted"
    assert body["status_url"] == f"/v1/settlements/{body['message_id']}"
    assert len(body["trace_id"]) == 32
    again = await client.post(
        "/v1/settlements/sync", json=record, headers={"X-Settlement-Run-ID": run}
    )
    assert again.status_code == 409
    assert again.json()["message_id"] == body["message_id"]
    detail = (await client.get(body["status_url"])).json()
    assert detail["state"] == "queued"


async def test_health_and_readiness(intake_only: Pipeline) -> None:
    client = _bare(intake_only)
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert (await client.get("/metrics")).status_code == 200
