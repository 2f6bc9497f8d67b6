"""Issue #6, the cases that broke, each as the test that shows it no longer does — on the real
broker, database and simulator. Effects are counted per key at the simulator (it dedupes by
key, so "took effect twice" is `effects` per key, and "sent more than needed" is POSTs per key).
The faults that need processes killed, frozen or restarted are in tests/faults."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ledger import acceptance
from ledger.crypto import PayloadCipher
from ledger.db import make_engine
from ledger.rows import Actor
from ops.bootstrap import run_worker
from ops.dev.simulator import Script
from runtime.kafka import KafkaPublisher
from schemas import samples
from schemas.envelope import SCHEMA_VERSION
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import (
    assert_contract_order,
    assert_effects_once,
    headers_of,
    message_id,
    never,
    produce,
    read_topic,
    signed_headers,
    states,
    wait_for,
)

pytestmark = pytest.mark.integration


async def dead_letters(pipe: Pipeline, **query: Any) -> list[dict[str, Any]]:
    response = await pipe.operator().get("/v1/reconciliation", params={"limit": 1000, **query})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def otc(run: str, contract: str, n: int) -> dict[str, Any]:
    """The n-th hour of a contract: its own settlement identity, position -n (a sale of n)."""
    record = samples.otc_confirmation(run, contract, volume=str(n))
    record["delivery_start"] = f"2026-12-01T{n:02d}:00:00Z"
    record["delivery_end"] = f"2026-12-01T{n:02d}:30:00Z"
    return record


# -- case 1: a claim racing the intake's acceptance -------------------------------------------


async def test_case1_concurrent_small_batches_are_delivered_never_dead_lettered(
    pipeline_factory: PipelineFactory,
) -> None:
    """16 clients x batches of 3 while 2 workers run: the old claim raced the intake's open
    acceptance and dead-lettered ~5 % as invalid_message "revision_conflict"."""
    pipe: Pipeline = await pipeline_factory(worker_concurrency=32)
    second_stop = asyncio.Event()
    second = asyncio.create_task(run_worker(pipe.settings, second_stop))
    try:
        run = samples.run_id()
        client = pipe.client()

        async def desk(n: int) -> list[dict[str, Any]]:
            accepted = []
            for b in range(20):
                records = samples.mixed_batch(run, 3, contracts=3, prefix=f"C1-{n:02d}-{b:02d}")
                response = await submit_batch(client, run, records)
                assert response.status_code == 202, response.text
                accepted.append(response.json())
            return accepted

        batches = [b for d in await asyncio.gather(*(desk(n) for n in range(16))) for b in d]
        ids = [m["message_id"] for b in batches for m in b["messages"]]
        assert len(ids) == 960
        for batch in batches:
            final = await pipe.wait_final(client, batch["batch_id"], timeout=120)
            assert final["counts"] == {"delivered": 3}, final["counts"]
        assert_effects_once(pipe.sim, ids)
        assert await dead_letters(pipe) == []
    finally:
        second_stop.set()
        await asyncio.wait_for(second, 60)


# -- case 3: a drifted answer lost with the worker ---------------------------------------------


async def test_case3_redelivery_without_position_is_delivered_and_says_drift_was_not_checked(
    pipeline_factory: PipelineFactory,
) -> None:
    """Issue #6 case 3 first held such a record for an analyst; CONTRACT §4 says a 200 or 409
    with a transaction id for a key the upstream already has is delivered, and a hold is for a
    position that differs — so it is delivered, and its history says the check did not run.
    With the position repeated on the 200, a drift found there is still held."""
    pipe: Pipeline = await pipeline_factory(sim={"drift_contracts": ["DRIFT-*"]})
    client = pipe.client()
    run = samples.run_id()

    async def booked_before(contract: str) -> tuple[str, dict[str, Any]]:
        """An earlier POST took effect with a drifted position and its worker died before it
        wrote the answer: the upstream has the record when it is submitted."""
        raw = samples.iso_award(run, contract)
        key = message_id("power-east", raw)
        pipe.sim.book(key, {"contract_id": contract}, "150.000", "153.000")
        response = await submit_batch(client, run, [raw])
        return key, await pipe.wait_final(client, response.json()["batch_id"])

    # asked again, the upstream answers 200 without a position
    key, final = await booked_before("DRIFT-LOST-01")
    assert final["counts"] == {"delivered": 1}
    assert len(pipe.sim.effects) == 1  # still the one effect
    assert pipe.sim.posts_by_key[key] == 1
    detail = (await client.get(f"/v1/settlements/{key}")).json()
    assert detail["upstream_transaction_id"] == pipe.sim.by_key[key].transaction_id
    assert (
        "answered 200 with no reconciled position: drift not checked"
        in (detail["history"][-1]["detail"])
    )
    holds = (await pipe.operator().get("/v1/holds")).json()["items"]
    assert [h for h in holds if h["message_id"] == key] == []

    # The same, with the upstream repeating the position it booked: the drift is found, held.
    pipe.sim.config.position_on_duplicates = True
    key, final = await booked_before("DRIFT-LOST-02")
    assert final["counts"] == {"held": 1}
    holds = (await pipe.operator().get("/v1/holds")).json()["items"]
    [hold] = [h for h in holds if h["message_id"] == key]
    assert (hold["reconciled_position_mwh"], hold["variance"]) == ("153.000", "3.000000")


# -- case 5: hostile headers ---------------------------------------------------------------


async def test_case5_any_header_bytes_end_as_dead_letters_and_the_partition_moves_on(
    pipeline: Pipeline,
) -> None:
    pipe = pipeline
    contract = "CASE5-HDR-0001"  # the key of every record below: one partition
    run = samples.run_id()
    good_value = b'{"contract_id": "CASE5-HDR-0001"}'
    identity = {
        "message_id": "m",
        "desk": "power-east",
        "trader": "t",
        "trace_id": "x",
        "schema_version": SCHEMA_VERSION,
    }
    hostile: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (contract.encode(), b"", []),
        (contract.encode(), None, [("message_id", None)]),
        (contract.encode(), b"\xff\xfe\x00", [("desk", b"\xff\x00\xfe")]),
        (contract.encode(), good_value, [("message_id", b"\x00" * 40), ("desk", b"\xc3\x28")]),
        (contract.encode(), good_value, [("signature", b"kid=\x00,v1=\xff")]),
        (contract.encode(), good_value, [("signature", b"")]),
        (contract.encode(), good_value, [(k, v.encode()) for k, v in identity.items()]),
        (contract.encode(), b"\x00" * 5000, [("trace_id", b"\x1b[31mred\x1b[0m")]),
        (contract.encode(), good_value, [("message_id", b"a"), ("message_id", b"b")]),
        (None, b"{}", [("desk", "\ud800".encode("utf-8", "surrogatepass"))]),
        (contract.encode(), b"[1, 2, 3]", [("x", b"y" * 10_000)]),
        (contract.encode(), b"not json", []),
        # Signed with our key, yet not a settlement record / not accepted by the intake.
        (contract.encode(), b"{}", signed_headers(b"{}", identity, pipe.settings.signing_keys())),
        (
            contract.encode(),
            good_value,
            signed_headers(good_value, identity, pipe.settings.signing_keys()),
        ),
        (
            contract.encode(),
            b"\x00\xff",
            signed_headers(b"\x00\xff", identity, pipe.settings.signing_keys()),
        ),
        (contract.encode(), good_value, [("schema_version", b"\x00")]),
    ]
    assert len(hostile) == 16
    await produce(pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_standard, hostile)
    client = pipe.client()
    response = await submit_batch(client, run, [samples.otc_confirmation(run, contract)])
    final = await pipe.wait_final(client, response.json()["batch_id"])
    assert final["counts"] == {"delivered": 1}

    lane = pipe.settings.topic_standard

    async def sixteen() -> bool:
        return len([d for d in await dead_letters(pipe) if d["source_topic"] == lane]) == 16

    await wait_for(sixteen)
    items = [d for d in await dead_letters(pipe) if d["source_topic"] == lane]
    assert {d["reason"] for d in items} <= {"invalid_signature", "invalid_message"}
    assert len({(d["source_partition"], d["source_offset"]) for d in items}) == 16
    on_topic = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, at_least=16
    )
    assert len({headers_of(r)["dead_letter_id"] for r in on_topic}) == 16
    # The original bytes travel on unchanged, the error headers beside them.
    odd = [r for r in on_topic if r.value == b"\xff\xfe\x00"]
    assert len(odd) == 1
    assert ("desk", b"\xff\x00\xfe") in list(odd[0].headers)


# -- case 6: the broker away while a chain dead-letters ------------------------------------------


async def test_case6_dead_letter_while_the_broker_is_down_does_not_stop_the_contract(
    pipeline_factory: PipelineFactory,
) -> None:
    contract = "CASE6-BRK-0001"
    pipe: Pipeline = await pipeline_factory(
        sim={"latency_ms": 800, "scripts": [Script(contract, 422, b'{"error":"no"}', "-1")]},
    )
    client = pipe.client()
    run = samples.run_id()
    records = [otc(run, contract, n) for n in (1, 2, 3)]
    response = await submit_batch(client, run, records)
    assert response.status_code == 202
    batch_id = response.json()["batch_id"]
    first = response.json()["messages"][0]["message_id"]

    async def first_sent() -> bool:
        return pipe.sim.posts_by_key[first] > 0

    await wait_for(first_sent)
    pipe.infra.broker.pause()
    try:

        async def settled() -> bool:
            return sorted((await states(client, batch_id)).values()) == [
                "dead_lettered",
                "delivered",
                "delivered",
            ]

        # Ledger first: the dead letter and the later records settle with the broker away.
        await wait_for(settled, timeout=30)
    finally:
        pipe.infra.broker.resume()
    on_topic = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, at_least=1
    )
    assert [headers_of(r)["message_id"] for r in on_topic] == [first]
    assert_contract_order(
        pipe.sim, {m["message_id"]: m["index"] for m in response.json()["messages"]}
    )


# -- case 7: odd upstream answers ------------------------------------------------------------


async def test_case7_odd_answers_end_in_defined_states_and_stall_nothing(
    pipeline_factory: PipelineFactory,
) -> None:
    scripts = [
        Script("ODD-NUL-*", 422, b'{"error": "bad\\u0000input \\ud800 here"}'),
        Script(
            "ODD-BIG-*",
            201,
            b'{"transaction_id": "TX-BIG", "reconciled_position_mwh": "10000000000000"}',
            effect=True,
        ),
        Script("ODD-BIN-*", 201, b"\x00\xff\xfe binary", effect=True),
        Script("ODD-TXT-*", 201, b"created, thanks", effect=True),
        Script(
            "ODD-NAN-*",
            201,
            b'{"transaction_id": "TX-NAN", "reconciled_position_mwh": NaN}',
            effect=True,
        ),
        Script("ODD-HUGE-*", 500, b"x" * 2_000_000),
        Script("ODD-REDIR-*", 302, b"", headers={"Location": "http://elsewhere/"}),
    ]
    pipe: Pipeline = await pipeline_factory(sim={"scripts": scripts}, upstream_max_attempts=2)
    client = pipe.client()
    run = samples.run_id()
    odd = [
        samples.otc_confirmation(run, f"ODD-{kind}-{i:04d}")
        for kind in ("NUL", "BIG", "BIN", "TXT", "NAN", "HUGE", "REDIR")
        for i in range(2)
    ]
    good = samples.mixed_batch(run, 150, contracts=50, prefix="GOOD7")
    response = await submit_batch(client, run, [*odd, *good])
    assert response.status_code == 202
    final = await pipe.wait_final(client, response.json()["batch_id"], timeout=60)
    by_contract: dict[str, str] = {}
    good_states: Counter[str] = Counter()
    for message in final["messages"]:
        detail = (await client.get(f"/v1/settlements/{message['message_id']}")).json()
        by_contract[detail["contract_id"]] = detail["state"]
        if detail["contract_id"].startswith("GOOD7"):
            good_states[detail["state"]] += 1
        if detail["last_error"]:
            assert "\x00" not in detail["last_error"]
            assert len(detail["last_error"].encode()) <= 2048
    assert good_states == {"delivered": 150}
    expected = {
        "NUL": "dead_lettered",
        "BIG": "held",
        "BIN": "held",
        "TXT": "held",
        "NAN": "held",
        "HUGE": "dead_lettered",
        "REDIR": "dead_lettered",
    }
    for contract, state in by_contract.items():
        if contract.startswith("ODD-"):
            assert state == expected[contract.split("-")[1]], (contract, state)
    # A record the upstream booked is never dead-lettered (BIG, BIN, TXT, NAN were booked).
    booked = {e.contract_id for e in pipe.sim.effects}
    assert all(by_contract[c] != "dead_lettered" for c in booked)


# -- case 9: conflicting submissions racing each other ---------------------------------------


async def test_case9_one_of_two_conflicting_concurrent_submissions_wins(
    intake_pipeline: Pipeline,
) -> None:
    pipe = intake_pipeline
    client = pipe.client()
    run = samples.run_id()

    async def send(contract: str, volume: str) -> httpx.Response:
        return await client.post(
            "/v1/settlements/sync",
            json=samples.otc_confirmation(run, contract, volume=volume),
            headers={"X-Settlement-Run-ID": run},
        )

    answers = await asyncio.gather(
        *(send(f"C9-PAIR-{i:04d}", v) for i in range(40) for v in ("100", "101"))
    )
    for i in range(40):
        a, b = answers[2 * i], answers[2 * i + 1]
        codes = sorted([a.status_code, b.status_code])
        assert codes == [202, 409], (i, a.text, b.text)
        loser = a if a.status_code == 409 else b
        assert loser.json()["code"] == "revision_conflict"
        winner = b if loser is a else a
        status = await client.get(winner.json()["status_url"])
        assert status.status_code == 200
        assert status.json()["state"] == "queued"


# -- case 12: replays in the records' order; sequencing behind a dead letter ---------------------


async def test_case12_a_replay_goes_out_in_the_order_records_were_accepted(
    pipeline_factory: PipelineFactory,
) -> None:
    contract = "C12-ORDER-001"
    pipe: Pipeline = await pipeline_factory(
        sim={"scripts": [Script(contract, 503, b'{"error": "down"}')]}, upstream_max_attempts=1
    )
    client, ops = pipe.client(), pipe.operator()
    run = samples.run_id()
    response = await submit_batch(client, run, [otc(run, contract, 1), otc(run, contract, 2)])
    ids = [m["message_id"] for m in response.json()["messages"]]
    await pipe.wait_final(client, response.json()["batch_id"])
    # r1 is replayed alone while the upstream is still down: its new dead letter is now the
    # youngest of the two.
    first = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [ids[0]], "reason": "try again"}
    )
    assert first.status_code == 202

    async def r1_dead_again() -> bool:
        items = await dead_letters(pipe, contract_id=contract, status="open")
        return [d["message_id"] for d in items] == [ids[1], ids[0]]

    await wait_for(r1_dead_again)
    pipe.sim.config.scripts.clear()  # the upstream is back
    both = await ops.post(
        "/v1/reconciliation/replay",
        json={"filter": {"contract_id": contract}, "reason": "upstream back"},
    )
    assert both.status_code == 202

    async def delivered() -> bool:
        return set((await states(client, response.json()["batch_id"])).values()) == {"delivered"}

    await wait_for(delivered)
    assert [e.idempotency_key for e in pipe.sim.effects] == ids  # r1, then r2


async def test_case12_contract_sequencing_parks_and_continues_in_order(
    pipeline_factory: PipelineFactory,
) -> None:
    replayed, discarded = "C12-SEQ-REPLAY", "C12-SEQ-DISCRD"
    pipe: Pipeline = await pipeline_factory(
        sim={
            "scripts": [
                Script(replayed, 422, b'{"error": "not booked"}', "-1"),
                Script(discarded, 422, b'{"error": "not booked"}', "-1"),
            ]
        },
        sequence_dead_letters="contract",
    )
    client, ops = pipe.client(), pipe.operator()
    run = samples.run_id()

    def three(contract: str) -> list[dict[str, Any]]:
        return [otc(run, contract, n) for n in (1, 2, 3)]

    response = await submit_batch(client, run, [*three(replayed), *three(discarded)])
    batch_id = response.json()["batch_id"]
    ids = [m["message_id"] for m in response.json()["messages"]]
    final = await pipe.wait_final(client, batch_id)
    assert [m["state"] for m in final["messages"]] == ["dead_lettered", "parked", "parked"] * 2
    [head_dl] = await dead_letters(pipe, contract_id=replayed)
    assert head_dl["parked"] == 2
    parked = (await client.get(f"/v1/settlements/{ids[1]}")).json()
    assert parked["state"] == "parked"
    assert parked["parked_behind"] == head_dl["dead_letter_id"]
    assert pipe.sim.effects == []

    pipe.sim.config.scripts.clear()
    replay = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [ids[0]], "reason": "booked now"}
    )
    assert replay.status_code == 202
    [tail_dl] = await dead_letters(pipe, contract_id=discarded)
    discard = await ops.post(
        f"/v1/reconciliation/{tail_dl['dead_letter_id']}/discard",
        json={"reason": "cancelled with the counterparty"},
    )
    assert discard.status_code == 200, discard.text
    assert discard.json()["continued"] == 2

    async def settled() -> bool:
        return list((await states(client, batch_id)).values()) == [
            *["delivered"] * 3,
            "dead_lettered",
            "delivered",
            "delivered",
        ]

    await wait_for(settled)
    assert [e.idempotency_key for e in pipe.sim.effects if e.contract_id == replayed] == ids[:3]
    assert [e.idempotency_key for e in pipe.sim.effects if e.contract_id == discarded] == ids[4:]
    [closed] = await dead_letters(pipe, contract_id=discarded)
    assert closed["status"] == "discarded"


# -- case 13: dead letters are unique per cause, not per Kafka offset ----------------------------


async def test_case13_a_recreated_topic_repeats_offsets_and_loses_no_dead_letter(
    pipeline: Pipeline,
) -> None:
    pipe = pipeline
    lane = pipe.settings.topic_priority
    bootstrap = pipe.settings.kafka_bootstrap_servers
    await produce(bootstrap, lane, [(b"K13", b"first", [("n", b"1")])])

    async def recorded(n: int) -> bool:
        return len([d for d in await dead_letters(pipe) if d["source_topic"] == lane]) == n

    await wait_for(lambda: recorded(1))
    await pipe.stop_worker()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([lane])
        await asyncio.sleep(0.5)
        await admin.create_topics([NewTopic(lane, pipe.settings.kafka_partitions, 1)])
    finally:
        await admin.close()
    await produce(bootstrap, lane, [(b"K13", b"second", [("n", b"2")])])
    await pipe.start_worker()
    await wait_for(lambda: recorded(2))
    items = [d for d in await dead_letters(pipe) if d["source_topic"] == lane]
    assert len({(d["source_partition"], d["source_offset"]) for d in items}) == 1


# -- case 14: operators racing each other ----------------------------------------------------


async def test_case14_parallel_operator_actions_take_effect_once(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"drift_contracts": ["DRIFT-*"], "down_contracts": ["OUTAGE-*"]},
        upstream_max_attempts=1,
    )
    client = pipe.client()
    run = samples.run_id()
    response = await submit_batch(
        client,
        run,
        [samples.iso_award(run, "DRIFT-RACE-01"), samples.otc_confirmation(run, "OUTAGE-RACE-1")],
    )
    final = await pipe.wait_final(client, response.json()["batch_id"])
    held_id, dead_id = (m["message_id"] for m in final["messages"])
    [hold] = [
        h
        for h in (await pipe.operator().get("/v1/holds")).json()["items"]
        if h["message_id"] == held_id
    ]
    operators = [pipe.operator(f"op-{n}") for n in range(4)]
    rejects = await asyncio.gather(
        *(
            o.post(f"/v1/holds/{hold['hold_id']}/reject", json={"reason": f"no {n}"})
            for n, o in enumerate(operators)
        )
    )
    assert sorted(r.status_code for r in rejects) == [200, 409, 409, 409]
    pipe.sim.config.down_contracts = []
    replays = await asyncio.gather(
        *(
            o.post("/v1/reconciliation/replay", json={"message_ids": [dead_id], "reason": "back"})
            for o in operators
        )
    )
    assert sorted(r.status_code for r in replays) == [202, 422, 422, 422]

    async def delivered() -> bool:
        return (await states(client, response.json()["batch_id"]))[dead_id] == "delivered"

    await wait_for(delivered)

    async def more_than_one_drift_rejection() -> bool:
        on_topic = await read_topic(
            pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, timeout=1
        )
        drift = [r for r in on_topic if headers_of(r)["error.reason"] == "drift_rejected"]
        return len(drift) > 1

    await never(more_than_one_drift_rejection, seconds=3, every=0.5)
    replayed_copies = [
        r
        for r in await read_topic(
            pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_standard
        )
        if "replay_of" in headers_of(r)
    ]
    assert len(replayed_copies) == 1
    assert pipe.sim.posts_by_key[dead_id] == 2  # the failed POST, and the replay's one
    assert_effects_once(pipe.sim, [held_id, dead_id])


# -- case 15: a record the worker refuses after the intake accepted it ----------------------------


async def test_case15_what_a_worker_cannot_send_is_dead_lettered_not_left_queued(
    pipeline: Pipeline,
) -> None:
    pipe = pipeline
    client = pipe.client()
    run = samples.run_id()
    tiny = samples.otc_confirmation(run, "C15-TINY-0001", price="1e-999999999999")
    refused = await submit_batch(client, run, [tiny])
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "fixed_price"
    assert refused.json()["errors"][0]["index"] == 0

    # Accepted by an intake of another version that let through what this worker refuses.
    value = b'{"contract_id": "C15-BAD-00001", "settlement_price": "-1"}'
    engine = make_engine(pipe.settings.database_url)
    kafka = KafkaPublisher(pipe.settings)
    cipher = PayloadCipher(pipe.settings.encryption_keyring())
    batch_id = f"batch_{uuid.uuid4().hex}"
    mid = "c15" + uuid.uuid4().hex[:29]
    request = acceptance.Request(
        batch_id=batch_id,
        desk="power-east",
        trader="trader-1",
        settlement_run_id=run,
        idempotency_key=batch_id,
        request_hash=batch_id,
        trace_id="t15",
        resource_kind="batch",
        resource_id=batch_id,
        status_url=f"/v1/batches/{batch_id}",
        records=[
            acceptance.RecordToAccept(
                0,
                mid,
                "identity-c15",
                "C15-BAD-00001",
                "otc_bilateral",
                1,
                pipe.settings.topic_standard,
                "1.000",
                value,
            )
        ],
        pending_lease_s=30,
        key_lease_s=30,
    )
    try:
        assert isinstance(await acceptance.begin(engine, request, cipher), acceptance.Pending)
        headers = {
            "message_id": mid,
            "desk": "power-east",
            "trader": "trader-1",
            "trace_id": "t15",
            "schema_version": SCHEMA_VERSION,
            "batch_id": batch_id,
        }
        await kafka.send_all(
            [
                (
                    pipe.settings.topic_standard,
                    b"C15-BAD-00001",
                    value,
                    signed_headers(value, headers, pipe.settings.signing_keys()),
                )
            ]
        )
        assert await acceptance.complete(engine, request, Actor("system", "t"), 1)
    finally:
        await kafka.stop()
        await engine.dispose()
    final = await pipe.wait_final(client, batch_id)
    assert final["counts"] == {"dead_lettered": 1}
    [dead] = await dead_letters(pipe, reason="invalid_message")
    assert dead["message_id"] == mid
    assert pipe.sim.posts == 0


# -- the door: hostile bodies get an answer ------------------------------------------------


async def test_oversized_body_gets_a_413_answer_not_a_dropped_connection(
    intake_pipeline: Pipeline,
) -> None:
    client = intake_pipeline.client()
    run = samples.run_id()
    body = b'{"records": [' + b" " * (17 * 1024 * 1024) + b"]}"
    response = await client.post(
        "/v1/settlements/batches",
        content=body,
        headers={
            "X-Settlement-Run-ID": run,
            "Idempotency-Key": "big",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


async def test_nan_literal_names_its_record_and_field(intake_pipeline: Pipeline) -> None:
    client = intake_pipeline.client()
    run = samples.run_id()
    good = json.dumps(samples.otc_confirmation(run, "OTC-NAN-0001")).encode()
    bad = good.replace(b'"volume_mwh": "400"', b'"volume_mwh": NaN')
    assert bad != good
    response = await client.post(
        "/v1/settlements/batches",
        content=b'{"records": [' + good + b", " + bad + b"]}",
        headers={
            "X-Settlement-Run-ID": run,
            "Idempotency-Key": "nan",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert (error["index"], error["field"]) == (1, "volume_mwh")
    assert "NaN" in error["message"]


@pytest.fixture
async def intake_pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    pipe: Pipeline = await pipeline_factory(worker=False)
    return pipe
