"""End to end on real Tansu + real Postgres: intake -> Kafka -> worker -> simulator."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import never, wait_for

pytestmark = pytest.mark.integration


def every_kind(run: str, tag: str) -> list[dict[str, Any]]:
    return [
        samples.iso_award(run, f"PJM-DA-{tag}"),
        samples.iso_award(run, f"ERC-DA-{tag}", iso="ERCOT", price="-8.5"),
        samples.canonical(run, f"RT-{tag}-01"),
        samples.otc_confirmation(run, f"OTC-{tag}-01"),
        samples.gas_nomination(run, f"GAS-{tag}-01"),
        samples.gas_nomination(run, f"PWR-{tag}-01", unit="MWh") | {"commodity": "power"},
    ]


async def test_batch_of_every_kind_is_delivered_and_readable(pipeline: Pipeline) -> None:
    client = pipeline.client()
    run, tag = samples.run_id(), uuid.uuid4().hex[:6].upper()
    response = await submit_batch(client, run, every_kind(run, tag))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 6
    assert [m["index"] for m in body["messages"]] == list(range(6))
    assert body["status_url"] == f"/v1/batches/{body['batch_id']}"

    batch = await pipeline.wait_final(client, body["batch_id"])
    assert batch["counts"] == {"delivered": 6}
    assert batch["desk"] == "power-east"
    assert batch["settlement_run_id"] == run
    assert batch["created_at"].endswith("Z")

    message_id = body["messages"][3]["message_id"]
    detail = (await client.get(f"/v1/settlements/{message_id}")).json()
    assert detail["state"] == "delivered"
    assert detail["contract_id"] == f"OTC-{tag}-01"
    assert detail["attempts"] == 1
    assert detail["upstream_transaction_id"].startswith("TX-")
    assert detail["batch_id"] == body["batch_id"]
    assert next(h["state"] for h in detail["history"]) in ("queued", "delivering")
    assert detail["history"][-1]["state"] == "delivered"

    received = pipeline.sim.effects
    assert len(received) == 6
    otc = next(e for e in received if e.contract_id == f"OTC-{tag}-01")
    assert otc.position_mwh == "-400.000"  # a sell is a negative position
    gas = next(e for e in received if e.contract_id == f"GAS-{tag}-01")
    assert gas.position_mwh == "2930.711"  # 10,000 MMBtu x 0.29307107, half-even


async def test_same_batch_twice(pipeline: Pipeline) -> None:
    client = pipeline.client()
    run, tag = samples.run_id(), uuid.uuid4().hex[:6].upper()
    records = every_kind(run, tag)
    first = await submit_batch(client, run, records, key="batch-key-1")
    assert first.status_code == 202
    batch_id = first.json()["batch_id"]

    same_key = await submit_batch(client, run, records, key="batch-key-1")
    assert same_key.status_code == 409
    assert same_key.json()["batch_id"] == batch_id
    assert same_key.headers["location"] == f"/v1/batches/{batch_id}"

    new_key = await submit_batch(client, run, records, key="batch-key-2")
    assert new_key.status_code == 202
    assert [m["message_id"] for m in new_key.json()["messages"]] == [
        m["message_id"] for m in first.json()["messages"]
    ]
    await pipeline.wait_final(client, batch_id)
    second = await pipeline.wait_final(client, new_key.json()["batch_id"])
    assert second["counts"] == {"delivered": 6}
    await never(lambda: len(pipeline.sim.effects) > 6, 1.0)  # no stray duplicate
    per_key = Counter(e.idempotency_key for e in pipeline.sim.effects)
    assert len(per_key) == 6
    assert set(per_key.values()) == {1}


async def test_transient_failures_then_delivered(pipeline_factory: PipelineFactory) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"fail_first_attempts": 2})
    client = pipe.client()
    run = samples.run_id()
    response = await submit_batch(client, run, [samples.otc_confirmation(run, "OTC-RETRY-001")])
    batch = await pipe.wait_final(client, response.json()["batch_id"])
    assert batch["counts"] == {"delivered": 1}
    detail = (await client.get(f"/v1/settlements/{batch['messages'][0]['message_id']}")).json()
    assert detail["attempts"] == 3
    assert pipe.sim.posts == 3
    assert len(pipe.sim.effects) == 1


async def _read_dead_letters(pipe: Pipeline, expected: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        pipe.settings.topic_reconciliation,
        bootstrap_servers=pipe.settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        for _ in range(50):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                found.extend(records)
            if len(found) >= expected:
                break
    finally:
        await consumer.stop()
    return found


async def test_permanent_rejection_is_dead_lettered_at_once(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"reject_contracts": ["REJECT-*"]})
    client = pipe.client()
    run = samples.run_id()
    record = samples.otc_confirmation(run, "REJECT-OTC-01")
    response = await submit_batch(client, run, [record])
    batch = await pipe.wait_final(client, response.json()["batch_id"])
    assert batch["counts"] == {"dead_lettered": 1}
    message_id = batch["messages"][0]["message_id"]
    detail = (await client.get(f"/v1/settlements/{message_id}")).json()
    assert detail["attempts"] == 1
    assert "not booked" in detail["last_error"]
    assert pipe.sim.posts == 1

    [dead] = await _read_dead_letters(pipe, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.key == b"REJECT-OTC-01"
    assert headers["message_id"] == message_id
    assert headers["desk"] == "power-east"
    assert headers["schema_version"] == "1"
    assert headers["signature"].startswith("kid=k1,v1=")
    assert headers["error.reason"] == "upstream_rejected"
    assert headers["error.status"] == "422"
    assert "not booked" in headers["error.message"]
    assert headers["error.attempts"] == "1"
    assert headers["error.first_attempt_at"].endswith("Z")
    assert headers["error.last_attempt_at"].endswith("Z")
    assert headers["source.topic"] == pipe.settings.topic_standard
    assert int(headers["source.partition"]) >= 0
    assert int(headers["source.offset"]) >= 0
    assert b'"contract_id":"REJECT-OTC-01"' in dead.value


async def test_upstream_down_past_budget_is_retries_exhausted(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"outage": True}, upstream_max_attempts=3)
    client = pipe.client()
    run = samples.run_id()
    response = await submit_batch(client, run, [samples.canonical(run, "RT-DOWN-0001")])
    batch = await pipe.wait_final(client, response.json()["batch_id"])
    assert batch["counts"] == {"dead_lettered": 1}
    detail = (await client.get(f"/v1/settlements/{batch['messages'][0]['message_id']}")).json()
    assert detail["attempts"] == 3
    [dead] = await _read_dead_letters(pipe, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["error.reason"] == "retries_exhausted"
    assert headers["error.status"] == "503"
    assert headers["error.attempts"] == "3"
    assert headers["source.topic"] == pipe.settings.topic_priority  # real-time: priority lane
    assert pipe.sim.effects == []


async def test_lower_revision_after_delivery_is_superseded(pipeline: Pipeline) -> None:
    client = pipeline.client()
    run = samples.run_id()
    rev2 = samples.otc_confirmation(run, "OTC-REV-0001", revision=2, volume="410")
    first = await submit_batch(client, run, [rev2])
    await pipeline.wait_final(client, first.json()["batch_id"])
    rev1 = samples.otc_confirmation(run, "OTC-REV-0001", revision=1, volume="400")
    late = await submit_batch(client, run, [rev1])
    assert late.status_code == 202
    batch = await pipeline.wait_final(client, late.json()["batch_id"])
    assert batch["counts"] == {"superseded": 1}
    assert [e.revision for e in pipeline.sim.effects] == [2]


async def test_drifted_reconciliation_is_held(pipeline_factory: PipelineFactory) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"drift_contracts": ["DRIFT-*"]})
    client = pipe.client()
    run = samples.run_id()
    ok = samples.iso_award(run, "PJM-OK-0001")
    drifted = samples.iso_award(run, "DRIFT-PJM-01")
    response = await submit_batch(client, run, [ok, drifted])
    batch = await pipe.wait_final(client, response.json()["batch_id"])
    assert [m["state"] for m in batch["messages"]] == ["delivered", "held"]


async def test_signed_message_injected_without_signature_is_dead_lettered(
    pipeline: Pipeline,
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.kafka_bootstrap_servers)
    await producer.start()
    run = samples.run_id()
    value = b'{"contract_id":"FORGED-00001","settlement_run_id":"' + run.encode() + b'"}'
    await producer.send_and_wait(
        pipeline.settings.topic_standard,
        value=value,
        key=b"FORGED-00001",
        headers=[
            ("message_id", b"forged"),
            ("desk", b"power-east"),
            ("trader", b"x"),
            ("trace_id", b"t"),
            ("schema_version", b"1"),
        ],
    )
    await producer.stop()
    [dead] = await _read_dead_letters(pipeline, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["error.reason"] == "invalid_signature"
    await never(lambda: pipeline.sim.posts > 0, 0.5)


async def test_two_workers_sharing_a_metrics_port_both_keep_delivering(
    pipeline: Pipeline,
) -> None:
    from ops.bootstrap import run_worker

    second_stop = asyncio.Event()
    second = asyncio.create_task(run_worker(pipeline.settings, second_stop))
    try:
        client = pipeline.client()
        run = samples.run_id()
        records = samples.mixed_batch(run, 40, contracts=20, prefix="TWO")
        response = await submit_batch(client, run, records)
        batch = await pipeline.wait_final(client, response.json()["batch_id"])
        assert batch["counts"] == {"delivered": 40}
        assert not second.done(), "the second worker stopped over a busy metrics port"
    finally:
        second_stop.set()
        await asyncio.wait_for(second, 30)


async def test_a_record_waiting_out_its_retries_does_not_hold_back_other_contracts(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"down_contracts": ["OUTAGE-*"]},
        upstream_max_attempts=1000,
        upstream_retry_budget_s=60.0,
    )
    client = pipe.client()
    run = samples.run_id()
    stuck = await submit_batch(client, run, [samples.otc_confirmation(run, "OUTAGE-HOL-01")])

    async def retrying() -> bool:  # the stuck record is in its retry loop
        return pipe.sim.failed_posts >= 2

    await wait_for(retrying, timeout=30)
    later = await submit_batch(
        client, run, [samples.otc_confirmation(run, f"OTC-HOL-{i:04d}") for i in range(5)]
    )
    others = await pipe.wait_final(client, later.json()["batch_id"], timeout=20)
    assert others["counts"] == {"delivered": 5}
    waiting = (await client.get(stuck.json()["status_url"])).json()
    # Still unsettled: in its retry loop, or queued again for a moment when the worker's lanes
    # rebalance (the lane that joins second revokes the first's partitions once).
    assert waiting["counts"] in ({"delivering": 1}, {"queued": 1})

    pipe.sim.config.down_contracts = []  # the upstream recovers for that contract too
    recovered = await pipe.wait_final(client, stuck.json()["batch_id"], timeout=20)
    assert recovered["counts"] == {"delivered": 1}
    assert len(pipe.sim.effects) == 6
    assert len({e.idempotency_key for e in pipe.sim.effects}) == 6
