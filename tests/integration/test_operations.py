"""The operations desk on real Tansu + Postgres: reconciliation queue, replay, four eyes, holds,
metrics (CONTRACT §3, issue 4)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from ledger import audit, reconciliation
from ledger.db import make_engine
from operations.publishing import Republisher
from operations.service import operator_actor
from schemas import samples
from schemas.envelope import sign_message
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import never, run_cli, wait_for

pytestmark = pytest.mark.integration
OPS = "ops:read ops:replay ops:holds"


async def inject(pipe: Pipeline, value: bytes, headers: dict[str, str], *, sign: bool) -> None:
    if sign:
        kid, secret = pipe.settings.signing_keys()[0]
        headers = {
            **headers,
            "signature": sign_message(value, headers, kid, secret.decode().encode()),
        }
    producer = AIOKafkaProducer(bootstrap_servers=pipe.settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            pipe.settings.topic_standard,
            value=value,
            key=b"INJECTED-0001",
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
    finally:
        await producer.stop()


async def dead_letters(client: httpx.AsyncClient, **query: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/reconciliation", params=query)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


@pytest.fixture
async def ops_pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    pipe: Pipeline = await pipeline_factory(
        sim={
            "reject_contracts": ["REJECT-*"],
            "down_contracts": ["OUTAGE-*"],
            "drift_contracts": ["DRIFT-*"],
            "token_outage": True,
        },
        upstream_max_attempts=2,
        # Every failure here belongs to one record; the breaker would (rightly) treat a token
        # endpoint down for good as an outage and keep the record instead of dead-lettering it.
        breaker_failures=1000,
    )
    return pipe


async def test_dead_letters_of_every_reason_listed_and_filtered(ops_pipeline: Pipeline) -> None:
    pipe = ops_pipeline
    desk = pipe.client(desk="power-east")
    ops = pipe.operator()
    run = samples.run_id()
    token_batch = await submit_batch(desk, run, [samples.otc_confirmation(run, "TOKEN-0001")])
    await pipe.wait_final(desk, token_batch.json()["batch_id"])
    pipe.sim.config.token_outage = False

    records = [
        samples.otc_confirmation(run, "REJECT-0001"),
        samples.otc_confirmation(run, "OUTAGE-0001"),
        samples.iso_award(run, "DRIFT-00001"),
    ]
    batch = await submit_batch(desk, run, records)
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    assert [m["state"] for m in final["messages"]] == ["dead_lettered", "dead_lettered", "held"]

    await inject(
        pipe,
        b'{"contract_id": "INJECTED-0001"}',
        {
            "message_id": "m",
            "desk": "power-east",
            "trader": "x",
            "trace_id": "t",
            "schema_version": "1",
        },
        sign=False,
    )
    await inject(
        pipe,
        b'{"not": "a settlement record"}',
        {
            "message_id": "m2",
            "desk": "power-east",
            "trader": "x",
            "trace_id": "t",
            "schema_version": "1",
        },
        sign=True,
    )

    holds = (await ops.get("/v1/holds", params={"state": "open"})).json()["items"]
    [hold] = [h for h in holds if h["contract_id"] == "DRIFT-00001"]
    rejected = await ops.post(
        f"/v1/holds/{hold['hold_id']}/reject", json={"reason": "position disputed with the ISO"}
    )
    assert rejected.status_code == 200, rejected.text

    lanes = {pipe.settings.topic_standard, pipe.settings.topic_priority}

    async def ours() -> list[dict[str, Any]]:  # the database is shared with other tests
        return [i for i in await dead_letters(ops, limit=1000) if i["source_topic"] in lanes]

    async def six() -> bool:
        return len(await ours()) >= 6

    await wait_for(six)
    items = await ours()
    reasons = Counter(i["reason"] for i in items)
    assert set(reasons) == {
        "token_unavailable",
        "upstream_rejected",
        "retries_exhausted",
        "invalid_signature",
        "invalid_message",
        "drift_rejected",
    }
    rejected_item = next(i for i in items if i["reason"] == "upstream_rejected")
    assert rejected_item["contract_id"] == "REJECT-0001"
    assert rejected_item["desk"] == "power-east"
    assert rejected_item["settlement_run_id"] == run
    assert rejected_item["status"] == "open"
    assert rejected_item["attempts"] == 1
    assert "not booked" in rejected_item["last_error"]
    assert rejected_item["first_attempt_at"].endswith("Z")
    assert rejected_item["source_topic"] == pipe.settings.topic_standard
    assert rejected_item["source_offset"] >= 0
    exhausted = next(i for i in items if i["reason"] == "retries_exhausted")
    assert exhausted["attempts"] == 2

    only = await dead_letters(ops, reason="retries_exhausted", settlement_run_id=run)
    assert [i["contract_id"] for i in only] == ["OUTAGE-0001"]
    assert [
        i["reason"]
        for i in await dead_letters(ops, contract_id="REJECT-0001", settlement_run_id=run)
    ] == ["upstream_rejected"]
    assert len(await dead_letters(ops, settlement_run_id=run)) == 4
    assert await dead_letters(ops, desk="gas-west", settlement_run_id=run) == []
    assert await dead_letters(ops, since="2099-01-01T00:00:00Z") == []
    assert len(await dead_letters(ops, until="2099-01-01T00:00:00Z", limit=1000)) >= 6
    # status: the entry's, or as a number the upstream's HTTP status in it
    assert len(await dead_letters(ops, status="open", settlement_run_id=run)) == 4
    assert await dead_letters(ops, status="replayed", settlement_run_id=run) == []
    assert rejected_item["error_status"] in (400, 404, 422)
    by_http = await dead_letters(ops, status=rejected_item["error_status"], settlement_run_id=run)
    assert [i["contract_id"] for i in by_http] == ["REJECT-0001"]
    # A misspelt reason or status is refused by name, not answered with an empty queue that
    # reads as "nothing dead-lettered".
    for field, value in (("reason", "upstream_rejectd"), ("status", "opened"), ("status", 99)):
        refused = await ops.get("/v1/reconciliation", params={field: value})
        assert refused.status_code == 422, refused.text
        assert field in {e["field"] for e in refused.json()["errors"]}
        preview = await ops.post(
            "/v1/reconciliation/replay",
            json={"filter": {field: value}, "reason": "typo", "dry_run": True},
        )
        assert preview.status_code == 422, preview.text

    page = (
        await ops.get("/v1/reconciliation", params={"limit": 3, "settlement_run_id": run})
    ).json()
    rest = (
        await ops.get(
            "/v1/reconciliation",
            params={"limit": 3, "settlement_run_id": run, "cursor": page["next_cursor"]},
        )
    ).json()
    ids = [i["dead_letter_id"] for i in page["items"] + rest["items"]]
    assert len(ids) == 4 == len(set(ids))
    assert rest["next_cursor"] is None

    # A desk token never reaches the operations routes.
    assert (await desk.get("/v1/reconciliation")).status_code == 403
    # The CLI shows the same queue.
    cli = await run_cli(
        pipe.env, "dlq", "list", "--json", "--reason", "upstream_rejected", "--run", run
    )
    assert cli.code == 0, cli.stderr[-2000:]
    assert [i["contract_id"] for i in json.loads(cli.stdout)] == ["REJECT-0001"]
    cli = await run_cli(
        pipe.env,
        "dlq",
        "list",
        "--json",
        "--run",
        run,
        "--status",
        str(rejected_item["error_status"]),
    )
    assert cli.code == 0, cli.stderr[-2000:]
    assert [i["contract_id"] for i in json.loads(cli.stdout)] == ["REJECT-0001"]
    for option, value in (("--reason", "upstream_rejectd"), ("--status", "opened")):
        cli = await run_cli(pipe.env, "dlq", "list", "--json", option, value)
        assert cli.code == 2, cli.stderr[-2000:]  # a usage error, named
        assert option in cli.stderr


async def test_replay_after_recovery_is_exactly_once(ops_pipeline: Pipeline) -> None:
    pipe = ops_pipeline
    pipe.sim.config.token_outage = False
    desk = pipe.client()
    ops = pipe.operator()
    run = samples.run_id()
    batch = await submit_batch(desk, run, [samples.otc_confirmation(run, "OUTAGE-RPL-01")])
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    message_id = final["messages"][0]["message_id"]
    pipe.sim.config.down_contracts = []  # the upstream is back

    dry = await ops.post(
        "/v1/reconciliation/replay",
        json={"message_ids": [message_id], "reason": "check", "dry_run": True},
    )
    assert dry.status_code == 200
    assert dry.json()["count"] == 1
    assert pipe.sim.effects == []

    replay = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [message_id], "reason": "upstream back"}
    )
    assert replay.status_code == 202, replay.text
    body = replay.json()
    assert body["state"] == "approved"
    assert body["needs_approval"] is False

    async def delivered() -> bool:
        detail = (await desk.get(f"/v1/settlements/{message_id}")).json()
        return bool(detail["state"] == "delivered")

    await wait_for(delivered)
    status = (await ops.get(f"/v1/reconciliation/replay/{body['replay_id']}")).json()
    assert status["state"] == "completed"
    assert status["progress"] == {"published": 1, "pending": 0}
    items = await dead_letters(ops, contract_id="OUTAGE-RPL-01")
    assert [i["status"] for i in items] == ["replayed"]

    again = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [message_id], "reason": "twice"}
    )
    assert again.status_code == 422  # nothing open to replay: a replay cannot run twice
    await never(lambda: len(pipe.sim.effects) > 1, 1.0)
    assert [e.idempotency_key for e in pipe.sim.effects] == [message_id]
    history = [
        h["state"] for h in (await desk.get(f"/v1/settlements/{message_id}")).json()["history"]
    ]
    replayed = history[history.index("dead_lettered") + 1 :]
    # A rebalance may hand the lease over once more (delivering again), nothing else.
    assert replayed[0] == "queued"
    assert replayed[-1] == "delivered"
    assert set(replayed[1:-1]) == {"delivering"}


async def test_replay_of_stale_revision_is_superseded(ops_pipeline: Pipeline) -> None:
    pipe = ops_pipeline
    pipe.sim.config.token_outage = False
    desk = pipe.client()
    ops = pipe.operator()
    run = samples.run_id()
    rev1 = samples.otc_confirmation(run, "OUTAGE-REV-01", revision=1, volume="100")
    first = await submit_batch(desk, run, [rev1])
    final = await pipe.wait_final(desk, first.json()["batch_id"])
    rev1_id = final["messages"][0]["message_id"]
    pipe.sim.config.down_contracts = []
    rev2 = samples.otc_confirmation(run, "OUTAGE-REV-01", revision=2, volume="120")
    second = await submit_batch(desk, run, [rev2])
    await pipe.wait_final(desk, second.json()["batch_id"])

    replay = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [rev1_id], "reason": "late"}
    )
    assert replay.status_code == 202

    async def superseded() -> bool:
        detail = (await desk.get(f"/v1/settlements/{rev1_id}")).json()
        return bool(detail["state"] == "superseded")

    await wait_for(superseded)
    assert [e.revision for e in pipe.sim.effects] == [2]


async def test_four_eyes(pipeline_factory: PipelineFactory) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"down_contracts": ["OUTAGE-*"]}, upstream_max_attempts=1, replay_approval_threshold=1
    )
    desk = pipe.client()
    alice, bob = pipe.operator("op-alice"), pipe.operator("op-bob")
    run = samples.run_id()
    batch = await submit_batch(
        desk,
        run,
        [
            samples.otc_confirmation(run, "OUTAGE-4E-001"),
            samples.otc_confirmation(run, "OUTAGE-4E-002"),
        ],
    )
    await pipe.wait_final(desk, batch.json()["batch_id"])
    pipe.sim.config.down_contracts = []

    request = await alice.post(
        "/v1/reconciliation/replay", json={"filter": {"settlement_run_id": run}, "reason": "bulk"}
    )
    assert request.status_code == 202
    body = request.json()
    assert body["needs_approval"] is True
    assert body["state"] == "pending_approval"
    assert body["count"] == 2
    await never(lambda: bool(pipe.sim.effects), 1.5)  # an unapproved replay ran

    own = await alice.post(f"/v1/reconciliation/replay/{body['replay_id']}/approve", json={})
    assert own.status_code == 403
    reader = pipe.client(desk="ops", scopes="ops:read", subject="op-carol")
    assert (
        await reader.post(f"/v1/reconciliation/replay/{body['replay_id']}/approve", json={})
    ).status_code == 403
    approved = await bob.post(
        f"/v1/reconciliation/replay/{body['replay_id']}/approve",
        json={"reason": "checked with the desk"},
    )
    assert approved.status_code == 202

    async def both() -> bool:
        return len(pipe.sim.effects) == 2

    await wait_for(both)
    status = (await alice.get(f"/v1/reconciliation/replay/{body['replay_id']}")).json()
    assert status["approved_by"] == "op-bob"
    assert status["requested_by"] == "op-alice"


class CrashAfterPublish(Republisher):
    """A runner that dies after its second chunk reached the broker, before recording it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marked = 0

    async def mark(self, job_id: str, items: list[Any], actor: Any) -> None:
        self.marked += 1
        if self.marked == 2:
            raise ConnectionError("intake died")
        await super().mark(job_id, items, actor)


async def test_interrupted_replay_resumes_without_duplicates(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"down_contracts": ["OUTAGE-*"]}, upstream_max_attempts=1
    )
    desk = pipe.client()
    run = samples.run_id()
    records = [samples.otc_confirmation(run, f"OUTAGE-INT-{i:03d}") for i in range(12)]
    batch = await submit_batch(desk, run, records)
    await pipe.wait_final(desk, batch.json()["batch_id"])
    pipe.sim.config.down_contracts = []

    svc = pipe.intake_services
    actor = operator_actor("op-dave")
    created = await svc.operations.request_replay(
        actor,
        message_ids=None,
        where=reconciliation.DeadLetterFilter(settlement_run_id=run),
        reason="bulk",
    )
    operations: Any = svc.operations
    running = operations.republisher  # the intake's own engine, producer and keys
    dying = CrashAfterPublish(
        running.engine,
        running.publisher,
        running.cipher,
        running.sealer,
        chunk=5,
        lease_s=0.5,
    )
    with pytest.raises(ConnectionError):
        await dying.run(created.replay_id, actor)
    # Whoever takes over once the dead runner's lease ran out (this test or the intake's
    # housekeeping) publishes the rest; the chunk published twice is delivered once.
    survivor = Republisher(running.engine, running.publisher, running.cipher, running.sealer)

    async def completed() -> bool:
        await survivor.run(created.replay_id, actor)
        status = await pipe.operator().get(f"/v1/reconciliation/replay/{created.replay_id}")
        return bool(status.json()["state"] == "completed")

    await wait_for(completed)

    async def all_delivered() -> bool:
        final = (await desk.get(f"/v1/batches/{batch.json()['batch_id']}")).json()
        return bool(final["counts"] == {"delivered": 12})

    await wait_for(all_delivered)
    keys = Counter(e.idempotency_key for e in pipe.sim.effects)
    assert len(keys) == 12
    assert set(keys.values()) == {1}
    posts = Counter(pipe.sim.posts_by_key)
    assert all(n <= 2 for n in posts.values()), posts  # at most the dead-lettered POST + one


async def test_holds_release_reject_and_scopes(pipeline_factory: PipelineFactory) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"drift_contracts": ["DRIFT-*"]})
    desk = pipe.client()
    ops = pipe.operator()
    run = samples.run_id()
    batch = await submit_batch(
        desk, run, [samples.iso_award(run, "DRIFT-HOLD-1"), samples.iso_award(run, "DRIFT-HOLD-2")]
    )
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    assert final["counts"] == {"held": 2}
    holds = (await ops.get("/v1/holds")).json()["items"]
    by_contract = {h["contract_id"]: h for h in holds}
    first, second = by_contract["DRIFT-HOLD-1"], by_contract["DRIFT-HOLD-2"]
    assert first["submitted_position_mwh"] == "150.000"
    assert first["reconciled_position_mwh"] == "153.000"
    assert first["variance"] == "3.000000"
    assert first["state"] == "open"

    trader = pipe.client(scopes="settlements:write settlements:read ops:read")
    assert (
        await trader.post(f"/v1/holds/{first['hold_id']}/release", json={"reason": "x"})
    ).status_code == 403
    assert (await desk.get("/v1/holds")).status_code == 403
    assert (await ops.post(f"/v1/holds/{first['hold_id']}/release", json={})).status_code == 422

    released = await ops.post(
        f"/v1/holds/{first['hold_id']}/release", json={"reason": "ISO meter correction confirmed"}
    )
    assert released.status_code == 200
    assert released.json()["state"] == "released"
    again = await ops.post(f"/v1/holds/{first['hold_id']}/reject", json={"reason": "late"})
    assert again.status_code == 409
    rejected = await ops.post(
        f"/v1/holds/{second['hold_id']}/reject", json={"reason": "position disputed"}
    )
    assert rejected.status_code == 200

    states = {
        m["message_id"]: m["state"]
        for m in (await desk.get(f"/v1/batches/{batch.json()['batch_id']}")).json()["messages"]
    }
    assert states == {first["message_id"]: "released", second["message_id"]: "rejected"}
    released_ids = {
        h["hold_id"] for h in (await ops.get("/v1/holds?state=released")).json()["items"]
    }
    assert first["hold_id"] in released_ids
    assert second["hold_id"] not in released_ids
    # a misspelt state is refused by name, not answered "no holds"
    misspelt = await ops.get("/v1/holds", params={"state": "opened"})
    assert misspelt.status_code == 422
    assert [e["field"] for e in misspelt.json()["errors"]] == ["state"]
    cli = await run_cli(pipe.env, "holds", "list", "--json", "--state", "opened")
    assert cli.code == 2
    assert "--state" in cli.stderr
    [dead] = await dead_letters(ops, reason="drift_rejected", settlement_run_id=run)
    assert dead["message_id"] == second["message_id"]

    engine = make_engine(pipe.settings.database_url or "")
    async with engine.connect() as conn:
        from sqlalchemy import text

        rows = (
            await conn.execute(
                text(
                    "SELECT action, actor, detail FROM audit_log WHERE subject_id IN (:a, :b) "
                    "ORDER BY seq"
                ),
                {"a": first["hold_id"], "b": second["hold_id"]},
            )
        ).all()
    await engine.dispose()
    assert ("hold.released", "op-alice", "ISO meter correction confirmed") in rows
    assert ("hold.rejected", "op-alice", "position disputed") in rows
    engine = make_engine(pipe.settings.database_url or "")
    assert (await audit.verify(engine)).ok
    await engine.dispose()


def sample_value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_metrics_match_what_happened(pipeline_factory: PipelineFactory) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"reject_contracts": ["REJECT-*"]})
    desk = pipe.client(desk="metrics-desk")
    before = {
        "accepted_std": sample_value(
            "etrm_intake_records_accepted_total", {"desk": "metrics-desk", "lane": "standard"}
        ),
        "accepted_pri": sample_value(
            "etrm_intake_records_accepted_total", {"desk": "metrics-desk", "lane": "priority"}
        ),
        "delivered": sample_value("etrm_worker_deliveries_total", {"outcome": "delivered"}),
        "dead": sample_value("etrm_worker_dead_letters_total", {"reason": "upstream_rejected"}),
    }
    run = samples.run_id()
    records = [
        samples.otc_confirmation(run, "OTC-MET-0001"),
        samples.canonical(run, "RT-MET-00001"),
        samples.canonical(run, "RT-MET-00002"),
        samples.otc_confirmation(run, "REJECT-MET-01"),
    ]
    batch = await submit_batch(desk, run, records)
    await pipe.wait_final(desk, batch.json()["batch_id"])
    # A worker counts an outcome just after writing it: the batch may read final a moment before.
    await wait_for(
        lambda: (
            sample_value("etrm_worker_deliveries_total", {"outcome": "delivered"})
            - before["delivered"]
            >= 3
        ),
        timeout=5,
        every=0.05,
    )
    assert (
        sample_value(
            "etrm_intake_records_accepted_total", {"desk": "metrics-desk", "lane": "standard"}
        )
        - before["accepted_std"]
        == 2
    )
    assert (
        sample_value(
            "etrm_intake_records_accepted_total", {"desk": "metrics-desk", "lane": "priority"}
        )
        - before["accepted_pri"]
        == 2
    )
    assert (
        sample_value("etrm_worker_deliveries_total", {"outcome": "delivered"}) - before["delivered"]
        == 3
    )
    assert (
        sample_value("etrm_worker_dead_letters_total", {"reason": "upstream_rejected"})
        - before["dead"]
        == 1
    )
    async with httpx.AsyncClient() as http:
        scraped = (
            await http.get(f"http://127.0.0.1:{pipe.settings.worker_metrics_port}/metrics")
        ).text
        health = (
            await http.get(f"http://127.0.0.1:{pipe.settings.worker_metrics_port}/healthz")
        ).json()
    assert "etrm_worker_upstream_latency_seconds_bucket" in scraped
    assert "etrm_worker_consumer_lag" in scraped
    assert health["upstream_token_valid"] is True
    intake_metrics = (await desk.get("/metrics")).text
    assert "etrm_dead_letters_open" in intake_metrics
    assert "etrm_intake_request_seconds_bucket" in intake_metrics
