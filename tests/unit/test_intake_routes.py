"""The intake's routes in-process (ASGI transport), with the ledger and the broker faked: status
codes, problem details, access rules, idempotency and the 503s of CONTRACT §3 — no servers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import REGISTRY
from pydantic import SecretStr

from ingest import acceptance
from ingest.app import create_app
from ingest.auth import JwksKeys, TokenVerifier
from ingest.deps import IntakeServices
from ingest.limits import DeskRateLimiter, FailureAlarm
from ingest.publisher import SettlementPublisher
from ingest.waiting import WaitingWatch
from ledger.crypto import PayloadCipher
from ledger.reconciliation import DeadLetterFilter
from ledger.rows import Actor, Circuit, MaintenanceWindow
from operations.service import OperationRefused, ReplayRequested
from ops.bootstrap import lane_sealer
from ops.dev.devkeys import generate_signing_key, mint_token
from runtime.settings import IntakeSettings, load
from schemas import samples
from schemas.envelope import header_map, verify_message
from schemas.records import iso_z
from schemas.states import BatchState, CircuitState, MessageState
from tests.fakes import DatabaseAway, FakeBroker, FakeLedger

ISSUER, AUDIENCE = "https://idp.unit", "etrm-unit"


class FakeOperations:
    """Answers the operations routes from a script; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.refuse: OperationRefused | None = None

    def _maybe_refuse(self) -> None:
        if self.refuse is not None:
            raise self.refuse

    async def list_dead_letters(
        self, where: DeadLetterFilter, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.calls.append(("list", where))
        return [], None

    async def replay_status(self, replay_id: str) -> dict[str, Any] | None:
        return None

    async def list_holds(
        self, *, state: str | None, desk: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return []

    async def preview_replay(
        self, *, message_ids: Sequence[str] | None, where: DeadLetterFilter | None
    ) -> dict[str, Any]:
        return {"dry_run": True, "count": 0, "needs_approval": False, "desks": [], "items": []}

    async def request_replay(
        self,
        actor: Actor,
        *,
        message_ids: Sequence[str] | None,
        where: DeadLetterFilter | None,
        reason: str,
    ) -> ReplayRequested:
        self._maybe_refuse()
        self.calls.append(("replay", actor.name))
        return ReplayRequested("replay_x", "pending_approval", 2, True, ["a", "b"])

    async def approve_replay(self, replay_id: str, actor: Actor, reason: str | None) -> None:
        self._maybe_refuse()
        self.calls.append(("approve", actor.name))

    async def run_replay(self, replay_id: str, actor: Actor) -> bool:
        return True

    async def resume_replays(self, actor: Actor) -> int:
        return 0

    async def discard(self, dead_letter_id: str, actor: Actor, reason: str) -> dict[str, Any]:
        self._maybe_refuse()
        self.calls.append(("discard", reason))
        return {
            "dead_letter_id": dead_letter_id,
            "message_id": "m",
            "status": "discarded",
            "continued": 0,
            "continuation_id": None,
        }

    async def upstream_status(self) -> dict[str, Any]:
        return {
            "circuit": "open",
            "since": "2026-12-02T08:00:00.000000Z",
            "next_probe_at": "2026-12-02T08:00:05.000000Z",
            "reason": "failures",
            "failures": 0,
            "probe_owner": None,
            "maintenance": [],
            "waiting": {"reason": "circuit_open", "until": "2026-12-02T08:00:05.000000Z"},
        }

    async def add_maintenance(
        self, actor: Actor, starts_at: datetime, ends_at: datetime, reason: str
    ) -> dict[str, Any]:
        self._maybe_refuse()
        self.calls.append(("maintenance", (actor.name, starts_at, ends_at, reason)))
        return {
            "id": "mw_1",
            "from": iso_z(starts_at),
            "until": iso_z(ends_at),
            "reason": reason,
            "created_by": actor.name,
            "created_at": iso_z(starts_at),
        }

    async def cancel_maintenance(self, window_id: str, actor: Actor) -> dict[str, Any]:
        self._maybe_refuse()
        self.calls.append(("cancel", window_id))
        return {
            "id": window_id,
            "from": "2026-12-06T02:00:00.000000Z",
            "until": "2026-12-06T04:00:00.000000Z",
            "reason": "r",
            "created_by": "op",
            "created_at": "2026-12-02T08:00:00.000000Z",
            "cancelled_at": "2026-12-02T09:00:00.000000Z",
            "cancelled_by": actor.name,
        }

    async def decide_hold(
        self, hold_id: str, decision: str, actor: Actor, reason: str
    ) -> dict[str, Any]:
        self._maybe_refuse()
        return {"hold_id": hold_id, "message_id": "m", "state": decision, "dead_letter_id": None}


@dataclass
class Intake:
    client: httpx.AsyncClient
    ledger: FakeLedger
    broker: FakeBroker
    operations: FakeOperations
    settings: IntakeSettings
    private_key: Path
    services: IntakeServices

    def token(
        self,
        desk: str = "power-east",
        scopes: str = "settlements:write settlements:read",
        **kwargs: Any,
    ) -> str:
        return mint_token(
            self.private_key,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=kwargs.pop("subject", "trader-1"),
            desk=desk,
            scopes=scopes.split(),
            **kwargs,
        )

    def auth(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[Intake]:
    private_key, jwks = generate_signing_key(tmp_path)
    settings = load(
        IntakeSettings,
        database_url="postgresql+asyncpg://unused@localhost/unused",
        jwks_url=str(jwks),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        message_signing_keys="k1=unit-secret",
        encryption_keys="e1=" + "A" * 43 + "=",
        max_body_bytes=64 * 1024,
        desk_rate_limits="slow-desk=1:2",
        desk_record_rate_limits="bulk-desk=10:100",
    )
    ledger, broker, operations = FakeLedger(), FakeBroker(), FakeOperations()
    services = IntakeServices(
        settings=settings,
        ledger=ledger,
        kafka=broker,
        publisher=SettlementPublisher(
            broker,
            settings.lanes,
            lane_sealer(settings, PayloadCipher(settings.encryption_keyring())),
        ),
        verifier=TokenVerifier(JwksKeys(str(jwks)), issuer=ISSUER, audience=AUDIENCE, leeway_s=30),
        operations=operations,
        rate_limiter=DeskRateLimiter(*settings.desk_rates()),
        record_limiter=DeskRateLimiter(*settings.desk_record_rates(), unit="record"),
        waiting=WaitingWatch(ledger.upstream_view, ttl_s=0.0),
        alarm=FailureAlarm(),
    )

    async def build() -> IntakeServices:
        return services

    app = create_app(build, body_limit=settings.max_body_bytes)
    app.state.services, app.state.background = services, set()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
        yield Intake(client, ledger, broker, operations, settings, private_key, services)


def batch_headers(run: str, key: str | None = None) -> dict[str, str]:
    return {"X-Settlement-Run-ID": run, "Idempotency-Key": key or uuid.uuid4().hex}


async def submit(
    intake: Intake, run: str, records: list[dict[str, Any]], key: str | None = None, **auth: Any
) -> httpx.Response:
    return await intake.client.post(
        "/v1/settlements/batches",
        json={"records": records},
        headers={**batch_headers(run, key), **intake.auth(**auth)},
    )


async def test_accepted_batch_is_published_signed_and_readable(intake: Intake) -> None:
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-UNIT-001"), samples.canonical(run, "RT-UNIT-01")]
    response = await submit(intake, run, records)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["status_url"] == f"/v1/batches/{body['batch_id']}"
    assert [m["index"] for m in body["messages"]] == [0, 1]
    topics = [topic for topic, _, _, _ in intake.broker.records]
    assert topics == [intake.settings.topic_standard, intake.settings.topic_priority]
    for _, key, value, headers in intake.broker.records:
        signed = header_map(headers)
        assert verify_message(value, signed, dict(intake.settings.signing_keys())) is None
        assert signed["batch_id"] == body["batch_id"]
        assert key in (b"OTC-UNIT-001", b"RT-UNIT-01")
    batch = (await intake.client.get(body["status_url"], headers=intake.auth())).json()
    assert batch["counts"] == {"queued": 2}
    detail = await intake.client.get(
        f"/v1/settlements/{body['messages'][0]['message_id']}", headers=intake.auth()
    )
    assert detail.json()["state"] == "queued"
    assert detail.json()["history"][0]["state"] == "queued"


async def test_a_record_accepted_before_is_not_published_again(intake: Intake) -> None:
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-UNIT-002")]
    assert (await submit(intake, run, records)).status_code == 202
    again = await submit(intake, run, records)  # another key, the same record
    assert again.status_code == 202
    assert len(intake.broker.records) == 1


async def test_a_batch_naming_one_record_twice_publishes_it_once_and_answers_each_index(
    intake: Intake,
) -> None:
    run = samples.run_id()
    before = samples.otc_confirmation(run, "OTC-UNIT-003")
    assert (await submit(intake, run, [before])).status_code == 202
    twice, new = samples.otc_confirmation(run, "OTC-UNIT-004"), samples.canonical(run, "RT-UNIT-04")
    response = await submit(intake, run, [twice, before, new, twice])
    assert response.status_code == 202, response.text
    body = response.json()
    ids = [m["message_id"] for m in body["messages"]]
    assert [m["index"] for m in body["messages"]] == [0, 1, 2, 3]
    assert (body["accepted"], ids[0] == ids[3], len(set(ids))) == (4, True, 3)
    published = [header_map(h)["message_id"] for _, _, _, h in intake.broker.records]
    assert published == [ids[1], ids[0], ids[2]]  # the earlier one, then each new one once


async def test_the_broker_not_acknowledging_is_a_503_and_nothing_is_accepted(
    intake: Intake,
) -> None:
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-UNIT-003")]
    intake.broker.failing = True
    refused = await submit(intake, run, records, key="k-503")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    [(_request, state)] = intake.ledger.batches.values()
    assert state is BatchState.ABORTED
    assert {r.state for r in intake.ledger.rows.values()} == {MessageState.ABORTED}
    intake.broker.failing = False
    accepted = await submit(intake, run, records, key="k-503")  # the same key works again
    assert accepted.status_code == 202


async def test_the_database_away_is_a_503_never_a_500(intake: Intake) -> None:
    run = samples.run_id()
    intake.ledger.away = True
    posted = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-004")])
    assert posted.status_code == 503
    assert posted.json()["code"] == "ledger_unavailable"
    assert posted.headers["retry-after"]
    read = await intake.client.get("/v1/batches/batch_x", headers=intake.auth())
    assert read.status_code == 503
    ready = await intake.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("unavailable")


def database_goes_away_as_it_accepts(intake: Intake, back_after_s: float | None) -> None:
    """The statement that accepts commits, and the database goes away before it answers; it
    is back after `back_after_s` (None: it stays away)."""
    accept = intake.ledger.complete

    async def complete(req: Any, actor: Actor, new: int) -> bool:
        await accept(req, actor, new)
        intake.ledger.away = True
        if back_after_s is not None:
            asyncio.get_running_loop().call_later(
                back_after_s, setattr, intake.ledger, "away", False
            )
        raise DatabaseAway()

    intake.ledger.complete = complete  # type: ignore[method-assign]


async def test_an_acceptance_whose_answer_was_lost_is_learnt_not_answered_503(
    intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It committed: the records will be delivered, so the answer is 202 once the database
    says so — never a 503, however long it is away within the outcome wait."""
    monkeypatch.setattr(acceptance, "OUTCOME_WAIT_S", 5.0)
    run = samples.run_id()
    database_goes_away_as_it_accepts(intake, back_after_s=1.5)
    answered = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-LOST")])
    assert answered.status_code == 202, answered.text
    assert {r.state for r in intake.ledger.rows.values()} == {MessageState.QUEUED}


async def test_an_acceptance_whose_outcome_stays_unknown_is_a_500_that_says_so(
    intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acceptance, "OUTCOME_WAIT_S", 1.0)
    run = samples.run_id()
    database_goes_away_as_it_accepts(intake, back_after_s=None)
    answered = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-GONE")])
    assert answered.status_code == 500
    assert answered.json()["code"] == "acceptance_outcome_unknown"
    intake.ledger.away = False
    again = await submit(
        intake,
        run,
        [samples.otc_confirmation(run, "OTC-UNIT-GONE")],
        key=intake.ledger.batches[next(iter(intake.ledger.batches))][0].idempotency_key,
    )
    assert again.status_code == 409  # the same key learns it was accepted
    assert again.json()["code"] == "duplicate_request"


async def test_idempotency_key_same_body_and_other_body(intake: Intake) -> None:
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-UNIT-005")]
    first = await submit(intake, run, records, key="k-dup")
    same = await submit(intake, run, records, key="k-dup")
    assert same.status_code == 409
    assert same.json()["code"] == "duplicate_request"
    assert same.json()["batch_id"] == first.json()["batch_id"]
    assert same.headers["location"] == first.json()["status_url"]
    other = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-006")], key="k-dup")
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"


async def test_revision_conflict_names_the_record(intake: Intake) -> None:
    run = samples.run_id()
    first = samples.otc_confirmation(run, "OTC-UNIT-007", volume="100")
    other = samples.otc_confirmation(run, "OTC-UNIT-007", volume="101")
    assert (await submit(intake, run, [first])).status_code == 202
    conflict = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-008"), other])
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "revision_conflict"
    assert conflict.json()["index"] == 1


@pytest.mark.parametrize(
    ("mutate", "index", "field"),
    [
        (lambda r: r.update(volume_mwh="NaN"), 1, "volume_mwh"),
        (lambda r: r.update(fixed_price="1e-999999999999"), 1, "fixed_price"),
        (lambda r: r.update(nickname="x"), 1, "nickname"),
        (lambda r: r.update(delivery_start="2026-02-30T00:00:00Z"), 1, "delivery_start"),
        (lambda r: r.update(counterparty="a\x00b"), 1, "counterparty"),
    ],
)
async def test_schema_errors_name_the_record_and_field(
    intake: Intake, mutate: Any, index: int, field: str
) -> None:
    run = samples.run_id()
    bad = samples.otc_confirmation(run, "OTC-UNIT-009")
    mutate(bad)
    response = await submit(intake, run, [samples.otc_confirmation(run, "OTC-UNIT-010"), bad])
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert (index, field) in {(e["index"], e["field"]) for e in response.json()["errors"]}
    assert intake.ledger.batches == {}  # a refused request leaves no trace


async def test_hostile_json_is_answered_not_crashed_on(intake: Intake) -> None:
    run = samples.run_id()
    headers = {**batch_headers(run), **intake.auth(), "Content-Type": "application/json"}
    for body, status in (
        (b'{"records": [{"\\ud800": 1}]}', 422),
        (b'{"records": [], "records": []}', 422),
        (b"{not json", 400),
        (b"[" * 20_000, 400),
        (b'{"records": [NaN]}', 422),
    ):
        response = await intake.client.post(
            "/v1/settlements/batches", content=body, headers=headers
        )
        assert response.status_code == status, (body[:30], response.text)
        json.loads(response.content)  # always a well-formed problem


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"X-Settlement-Run-ID": None}, 400),
        ({"X-Settlement-Run-ID": "lowercase0000000"}, 400),
        ({"X-Settlement-Run-ID": "AAAAAAAAAAAAAAAA"}, 400),
        ({"Idempotency-Key": None}, 400),
        ({"Idempotency-Key": "x" * 256}, 400),
        ({"Content-Type": "text/plain"}, 415),
    ],
)
async def test_header_errors(intake: Intake, change: dict[str, str | None], status: int) -> None:
    run = samples.run_id()
    headers: dict[str, str | None] = {
        **batch_headers(run),
        **intake.auth(),
        "Content-Type": "application/json",
    }
    headers.update(change)
    body = json.dumps({"records": [samples.otc_confirmation(run, "OTC-UNIT-011")]}).encode()
    response = await intake.client.post(
        "/v1/settlements/batches",
        content=body,
        headers={k: v for k, v in headers.items() if v is not None},
    )
    assert response.status_code == status, response.text


async def test_bodies_over_the_limit_are_413(intake: Intake) -> None:
    run = samples.run_id()
    headers = {**batch_headers(run), **intake.auth(), "Content-Type": "application/json"}
    declared = await intake.client.post(
        "/v1/settlements/batches", content=b" " * (65 * 1024), headers=headers
    )
    assert declared.status_code == 413

    async def streamed() -> AsyncIterator[bytes]:
        for _ in range(70):
            yield b" " * 1024

    chunked = await intake.client.post(
        "/v1/settlements/batches", content=streamed(), headers=headers
    )
    assert chunked.status_code == 413


async def test_access_rules(intake: Intake) -> None:
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-EAST-0001")]
    anonymous = await intake.client.post(
        "/v1/settlements/batches", json={"records": records}, headers=batch_headers(run)
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    reader = await submit(intake, run, records, scopes="settlements:read")
    assert reader.status_code == 403
    assert reader.json()["required_scope"] == "settlements:write"
    outside = await submit(intake, run, records, contracts=["OTC-WEST-*"])
    assert outside.status_code == 403
    accepted = await submit(intake, run, records)
    url = accepted.json()["status_url"]
    assert (await intake.client.get(url, headers=intake.auth(desk="gas-west"))).status_code == 404
    made_up = intake.auth(desk="gas-west", scopes="settlements:read ops:foo")
    assert (await intake.client.get(url, headers=made_up)).status_code == 404
    operator = intake.auth(desk="ops", scopes="settlements:read ops:read")
    assert (await intake.client.get(url, headers=operator)).status_code == 200
    spoof = await intake.client.post(
        "/v1/settlements/sync",
        json=samples.otc_confirmation(run, "OTC-EAST-0002"),
        headers={"X-Settlement-Run-ID": run, "X-Trader-Scope": "gas-west", **intake.auth()},
    )
    assert spoof.status_code == 403


async def test_every_request_leaves_one_access_line_with_its_trace_id(intake: Intake) -> None:
    def refused() -> float:
        labels = {"status": "401", "code": "unauthorized"}
        return REGISTRY.get_sample_value("etrm_intake_auth_failures_total", labels) or 0.0

    refused_before = refused()
    with structlog.testing.capture_logs() as lines:
        anonymous = await intake.client.get("/v1/batches/b-1")
        known = await intake.client.get("/v1/batches/b-1", headers=intake.auth())
    access = [line for line in lines if line["event"] == "request"]
    assert [(a["status"], a["desk"]) for a in access] == [(401, None), (404, "power-east")]
    assert [a["trace_id"] for a in access] == [
        anonymous.headers["x-trace-id"],
        known.headers["x-trace-id"],
    ]
    assert all(a["path"] == "/v1/batches/b-1" and a["method"] == "GET" for a in access)
    assert refused() == refused_before + 1


async def test_two_framings_of_one_body_are_refused_and_the_connection_closed(
    intake: Intake,
) -> None:
    run = samples.run_id()
    smuggled = await intake.client.post(
        "/v1/settlements/sync",
        content=json.dumps(samples.otc_confirmation(run, "OTC-FRAMING-1")).encode(),
        headers={
            **intake.auth(),
            "X-Settlement-Run-ID": run,
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
    )
    assert smuggled.status_code == 400
    assert smuggled.json()["code"] == "ambiguous_framing"
    assert smuggled.headers["connection"] == "close"
    assert intake.broker.records == []


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("/v1/batches/ab%00cd", "path"),
        ("/v1/settlements/m%1b[31m", "path"),
        ("/v1/reconciliation?desk=a%00b", "query parameter desk"),
        ("/v1/reconciliation?contract_id=%ED%A0%80", "query"),
        ("/v1/reconciliation?desk=x&%07=1", "query parameter (name)"),
    ],
)
async def test_control_characters_in_the_request_line_are_a_400_before_any_sql(
    intake: Intake, url: str, names: str
) -> None:
    operator = intake.auth(desk="ops", scopes="settlements:read ops:read")
    answer = await intake.client.get(url, headers=operator)
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_characters"
    assert answer.json()["detail"].startswith(names + " ")


async def test_printable_unicode_in_the_request_line_is_fine(intake: Intake) -> None:
    operator = intake.auth(desk="ops", scopes="settlements:read ops:read")
    answer = await intake.client.get("/v1/reconciliation?desk=caf%C3%A9", headers=operator)
    assert answer.status_code == 200


async def test_a_body_that_does_not_arrive_in_time_is_a_408(intake: Intake) -> None:
    import asyncio

    from ingest.limits import BodyLimit

    slow = httpx.ASGITransport(app=BodyLimit(intake.client._transport.app, 1 << 20, 0.3))  # type: ignore[attr-defined]
    run = samples.run_id()
    record = json.dumps(samples.otc_confirmation(run, "OTC-SLOWBODY-1")).encode()

    async def trickle() -> Any:
        yield record[:10]
        await asyncio.sleep(2)
        yield record[10:]

    async with httpx.AsyncClient(transport=slow, base_url="http://intake") as client:
        answer = await client.post(
            "/v1/settlements/sync",
            content=trickle(),
            headers={
                **intake.auth(),
                "X-Settlement-Run-ID": run,
                "Content-Type": "application/json",
            },
        )
    assert answer.status_code == 408
    assert answer.json()["code"] == "request_timeout"
    assert answer.headers["connection"] == "close"
    assert intake.broker.records == []


async def test_metrics_can_require_a_scrape_token(intake: Intake) -> None:
    assert (await intake.client.get("/metrics")).status_code == 200  # off by default
    intake.services.settings = intake.settings.model_copy(
        update={"metrics_token": SecretStr("scrape-secret")}
    )
    assert (await intake.client.get("/metrics")).status_code == 401
    wrong = {"Authorization": "Bearer scrape-secre"}
    assert (await intake.client.get("/metrics", headers=wrong)).status_code == 401
    right = {"Authorization": "Bearer scrape-secret"}
    scraped = await intake.client.get("/metrics", headers=right)
    assert scraped.status_code == 200
    assert "etrm_intake_request_seconds" in scraped.text


async def test_rate_limit_per_desk(intake: Intake) -> None:
    answers = [
        (
            await intake.client.get("/v1/batches/x", headers=intake.auth(desk="slow-desk"))
        ).status_code
        for _ in range(4)
    ]
    assert answers[:2] == [404, 404]
    assert 429 in answers[2:]
    assert (await intake.client.get("/v1/batches/x", headers=intake.auth())).status_code == 404


async def test_records_per_second_per_desk_besides_requests(intake: Intake) -> None:
    """A desk may send few requests but huge batches: its records are counted too, and only
    its own batches wait."""
    run = samples.run_id()
    big = [samples.otc_confirmation(run, f"BULK-{i:06d}") for i in range(80)]
    first = await submit(intake, run, big, desk="bulk-desk")
    assert first.status_code == 202, first.text
    second = await submit(intake, run, big[:40], desk="bulk-desk")
    assert second.status_code == 429
    assert second.json()["code"] == "record_rate_limited"
    assert int(second.headers["Retry-After"]) >= 1
    other = await submit(intake, run, big, desk="power-east")
    assert other.status_code == 202, other.text


async def test_operations_routes_scopes_and_refusals(intake: Intake) -> None:
    desk = intake.auth()
    assert (await intake.client.get("/v1/reconciliation", headers=desk)).status_code == 403
    alice = intake.auth(desk="ops", scopes="ops:read ops:replay ops:holds", subject="op-alice")
    listed = await intake.client.get("/v1/reconciliation", headers=alice)
    assert listed.json() == {"items": [], "next_cursor": None}
    replay = await intake.client.post(
        "/v1/reconciliation/replay", json={"message_ids": ["m1"], "reason": "back"}, headers=alice
    )
    assert replay.status_code == 202
    assert replay.json()["needs_approval"] is True
    for code, status in (
        ("four_eyes", 403),
        ("nothing_to_replay", 422),
        ("not_pending", 409),
        ("not_found", 404),
    ):
        intake.operations.refuse = OperationRefused(code, "no")
        refused = await intake.client.post(
            "/v1/reconciliation/replay/replay_x/approve", json={}, headers=alice
        )
        assert refused.status_code == status
        assert refused.json()["code"] == code
    intake.operations.refuse = None
    no_reason = await intake.client.post("/v1/holds/h1/release", json={}, headers=alice)
    assert no_reason.status_code == 422
    reader = intake.auth(desk="ops", scopes="ops:read")
    assert (
        await intake.client.post("/v1/holds/h1/release", json={"reason": "x"}, headers=reader)
    ).status_code == 403
    discard = await intake.client.post(
        "/v1/reconciliation/dl_1/discard", json={"reason": "cancelled"}, headers=alice
    )
    assert discard.status_code == 200
    assert discard.json() == {
        "dead_letter_id": "dl_1",
        "message_id": "m",
        "status": "discarded",
        "continued": 0,
    }


async def test_upstream_routes_scopes_bodies_and_refusals(intake: Intake) -> None:
    desk = intake.auth()
    reader = intake.auth(desk="ops", scopes="ops:read", subject="op-reader")
    admin = intake.auth(desk="ops", scopes="ops:read ops:upstream", subject="op-alice")
    assert (await intake.client.get("/v1/upstream", headers=desk)).status_code == 403
    status = await intake.client.get("/v1/upstream", headers=reader)
    assert status.status_code == 200
    assert status.json()["circuit"] == "open"
    window = {"from": "2026-12-06T02:00:00Z", "until": "2026-12-06T04:00:00Z", "reason": "patch"}
    denied = await intake.client.post("/v1/upstream/maintenance", json=window, headers=reader)
    assert denied.status_code == 403
    assert denied.json()["required_scope"] == "ops:upstream"
    created = await intake.client.post("/v1/upstream/maintenance", json=window, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["from"] == "2026-12-06T02:00:00.000000Z"
    assert (
        intake.operations.calls[-1][0],
        intake.operations.calls[-1][1][:1],
    ) == ("maintenance", ("op-alice",))
    for bad in ({**window, "extra": 1}, {"from": window["from"], "until": window["until"]}):
        answer = await intake.client.post("/v1/upstream/maintenance", json=bad, headers=admin)
        assert answer.status_code == 422
        assert answer.headers["content-type"] == "application/problem+json"
    intake.operations.refuse = OperationRefused("invalid_window", "until must be after from")
    refused = await intake.client.post("/v1/upstream/maintenance", json=window, headers=admin)
    assert (refused.status_code, refused.json()["code"]) == (422, "invalid_window")
    intake.operations.refuse = OperationRefused("not_found", "no such window")
    gone = await intake.client.delete("/v1/upstream/maintenance/mw_x", headers=admin)
    assert gone.status_code == 404
    intake.operations.refuse = None
    cancelled = await intake.client.delete("/v1/upstream/maintenance/mw_1", headers=admin)
    assert cancelled.status_code == 200
    assert cancelled.json()["cancelled_by"] == "op-alice"


async def test_status_reads_say_why_unsettled_records_wait(intake: Intake) -> None:
    run = samples.run_id()
    accepted = await submit(intake, run, [samples.otc_confirmation(run, "OTC-WAIT-0001")])
    batch_url = accepted.json()["status_url"]
    message_url = f"/v1/settlements/{accepted.json()['messages'][0]['message_id']}"
    assert (await intake.client.get(message_url, headers=intake.auth())).json()["waiting"] is None
    now = datetime.now(UTC)
    intake.ledger.circuit.circuit = Circuit(
        CircuitState.OPEN, now, "failures", next_probe_at=now + timedelta(seconds=60)
    )
    message = (await intake.client.get(message_url, headers=intake.auth())).json()
    assert message["waiting"] == {
        "reason": "circuit_open",
        "until": iso_z(now + timedelta(seconds=60)),
    }
    batch = (await intake.client.get(batch_url, headers=intake.auth())).json()
    assert batch["waiting"]["reason"] == "circuit_open"
    intake.ledger.circuit.circuit = Circuit(CircuitState.CLOSED, now)
    intake.ledger.circuit.windows.append(
        MaintenanceWindow("mw_9", now, now + timedelta(hours=1), "patch", "op", now)
    )
    message = (await intake.client.get(message_url, headers=intake.auth())).json()
    assert message["waiting"]["reason"] == "maintenance"
    for row in intake.ledger.rows.values():
        row.state = MessageState.DELIVERED
    settled = (await intake.client.get(message_url, headers=intake.auth())).json()
    assert settled["waiting"] is None
