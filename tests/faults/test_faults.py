"""Issue #6 faults one at a time, each as a test: the broker stalling mid-batch (case 4), a
replay while the broker is away (case 8), a worker killed between writing a dead letter and
publishing it (case 11), and the worker staying up through 30 s outages of the database and
of the broker (I5) — against the real broker and database, workers as real processes where
they must die."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from ledger.console import ConsoleReads
from ledger.db import make_engine
from operations.service import UpstreamOperations, operator_actor
from ops.dev.simulator import Script
from runtime.kafka import BuiltBatch, KafkaPublisher, OutgoingRecord, PublishFailed
from schemas import samples
from schemas.records import iso_z
from tests.conftest import Infra, Pipeline, PipelineFactory, fresh_database, submit_batch
from tests.support import (
    assert_effects_once,
    headers_of,
    message_id,
    never,
    read_topic,
    states,
    wait_for,
)

pytestmark = pytest.mark.faults


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        process.wait(40)


class HalfThenStall(KafkaPublisher):
    """The broker acknowledges the first half of a request's records, then stops answering:
    the publish times out (what a broker stalled mid-batch looks like to the intake). A big
    request's records come as record batches laid out in the intake's worker process
    (`send_built`): the broker takes the first batches holding about half of them."""

    acknowledged: list[bytes]

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None:
        half = list(records)[: len(records) // 2]
        await super().send_all(half, what=what)
        self.acknowledged = [value for _, _, value, _ in half]
        raise PublishFailed("TimeoutError")

    async def send_built(self, batches: Sequence[BuiltBatch], *, what: str = "") -> None:
        total = sum(count for *_, count in batches)
        half: list[BuiltBatch] = []
        for batch in batches:
            if sum(count for *_, count in half) >= total // 2:
                break
            half.append(batch)
        await super().send_built(half, what=what)
        self.acknowledged = [r.value for *_, buffer, _ in half for r in DefaultRecordBatch(buffer)]
        raise PublishFailed("TimeoutError")


async def test_case4_records_the_broker_took_before_a_503_never_take_effect(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory()
    client = pipe.client()
    run = samples.run_id()
    records = samples.mixed_batch(run, 400, contracts=40, prefix="STALL4")
    services = pipe.intake_services
    real = services.publisher.kafka
    stalling = HalfThenStall(pipe.settings)
    services.publisher.kafka = stalling
    try:
        refused = await submit_batch(client, run, records, key="stall-key")
    finally:
        services.publisher.kafka = real
        await stalling.stop()
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"]
    assert 150 <= len(stalling.acknowledged) < 400  # on the broker, for the worker to read

    async def any_effect() -> bool:
        return len(pipe.sim.effects) > 0

    await never(any_effect, seconds=6)
    accepted = await submit_batch(client, run, records, key="stall-key")
    assert accepted.status_code == 202, accepted.text
    final = await pipe.wait_final(client, accepted.json()["batch_id"], timeout=120)
    assert final["counts"] == {"delivered": 400}
    assert_effects_once(pipe.sim, [m["message_id"] for m in accepted.json()["messages"]])


async def test_case8_a_replay_whose_publish_fails_keeps_trying_and_is_not_replayed_twice(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"down_contracts": ["OUTAGE-*"]}, upstream_max_attempts=1
    )
    client, ops = pipe.client(), pipe.operator()
    run = samples.run_id()
    batch = await submit_batch(client, run, [samples.otc_confirmation(run, "OUTAGE-RPL8-01")])
    final = await pipe.wait_final(client, batch.json()["batch_id"])
    message_id = final["messages"][0]["message_id"]
    pipe.sim.config.down_contracts = []
    pipe.infra.broker.pause()
    try:
        first = await ops.post(
            "/v1/reconciliation/replay", json={"message_ids": [message_id], "reason": "back"}
        )
        assert first.status_code == 202
        replay_id = first.json()["replay_id"]
        second = await ops.post(
            "/v1/reconciliation/replay", json={"message_ids": [message_id], "reason": "again"}
        )
        assert second.status_code == 422, second.text

        async def given_up() -> bool:
            status = (await ops.get(f"/v1/reconciliation/replay/{replay_id}")).json()
            return bool(status["state"] != "running")

        # Past the publish timeout the replay's publish failed: it must stay running (to be
        # resumed), never end as failed or completed.
        await never(given_up, 3.5)
    finally:
        pipe.infra.broker.resume()

    async def delivered() -> bool:
        return (await states(client, batch.json()["batch_id"]))[message_id] == "delivered"

    await wait_for(delivered, timeout=60)

    async def completed() -> bool:
        status = (await ops.get(f"/v1/reconciliation/replay/{replay_id}")).json()
        return bool(status["state"] == "completed")

    await wait_for(completed)
    status = (await ops.get(f"/v1/reconciliation/replay/{replay_id}")).json()
    assert status["outcome"] == {"delivered": 1}
    assert_effects_once(pipe.sim, [message_id])


async def test_case11_a_worker_killed_before_publishing_a_dead_letter_loses_none_invents_none(
    pipeline_factory: PipelineFactory,
) -> None:
    contract = "C11-KILL-0001"
    pipe: Pipeline = await pipeline_factory(
        worker=False, sim={"scripts": [Script(contract, 422, b'{"error": "not booked"}')]}
    )
    client = pipe.client()
    run = samples.run_id()
    batch = await submit_batch(client, run, [samples.otc_confirmation(run, contract)])
    message_id = batch.json()["messages"][0]["message_id"]
    worker = pipe.spawn_worker()
    try:

        async def posted() -> bool:
            return pipe.sim.posts_by_key[message_id] > 0

        await wait_for(posted)
        pipe.infra.broker.pause()  # the outbox cannot publish now

        async def recorded() -> bool:
            return (await states(client, batch.json()["batch_id"]))[message_id] == "dead_lettered"

        await wait_for(recorded)
        stop(worker, signal.SIGKILL)  # dies with the dead letter not yet on the topic
    finally:
        pipe.infra.broker.resume()
        stop(worker, signal.SIGKILL)
    worker = pipe.spawn_worker()
    try:
        on_topic = await read_topic(
            pipe.settings.kafka_bootstrap_servers,
            pipe.settings.topic_reconciliation,
            at_least=1,
            timeout=60,
        )
    finally:
        stop(worker)
    listed = (await pipe.operator().get("/v1/reconciliation")).json()["items"]
    assert {i["dead_letter_id"] for i in listed} == {
        headers_of(r)["dead_letter_id"] for r in on_topic
    }
    assert [headers_of(r)["message_id"] for r in on_topic] == [message_id]


async def test_case11_a_hold_released_and_rejected_at_once_is_decided_once(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"drift_contracts": ["DRIFT-*"]})
    client = pipe.client()
    run = samples.run_id()
    records = [samples.iso_award(run, f"DRIFT-RACE-{i:02d}") for i in range(6)]
    batch = await submit_batch(client, run, records)
    await pipe.wait_final(client, batch.json()["batch_id"])
    holds = (await pipe.operator().get("/v1/holds")).json()["items"]
    assert len(holds) == 6
    alice, bob = pipe.operator("op-alice"), pipe.operator("op-bob")
    decisions: list[tuple[str, httpx.Response, httpx.Response]] = []
    for hold in holds:
        release, reject = await asyncio.gather(
            alice.post(f"/v1/holds/{hold['hold_id']}/release", json={"reason": "ok"}),
            bob.post(f"/v1/holds/{hold['hold_id']}/reject", json={"reason": "no"}),
        )
        assert sorted([release.status_code, reject.status_code]) == [200, 409]
        decisions.append((hold["message_id"], release, reject))
    rejected = {mid for mid, _, reject in decisions if reject.status_code == 200}

    async def phantom() -> bool:
        on_topic = await read_topic(
            pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, timeout=1
        )
        published = [headers_of(r)["message_id"] for r in on_topic]
        assert len(published) == len(set(published)), "a rejection published twice"
        return not set(published) <= rejected

    await never(phantom, seconds=4, every=0.5)
    on_topic = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, timeout=3
    )
    assert {headers_of(r)["message_id"] for r in on_topic} == rejected


async def test_i5_the_worker_outlives_a_35s_database_outage_and_the_intake_answers_503(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"latency_ms": 20})
    database = pipe.infra.database
    if database is None:
        pytest.skip("the database server is not ours to restart (ETRM_TEST_DATABASE_URL)")
    client = pipe.client()
    run = samples.run_id()
    before = await submit_batch(client, run, samples.mixed_batch(run, 300, prefix="DBOUT"))
    assert before.status_code == 202
    await asyncio.to_thread(database.stop)
    answers: list[int] = []
    try:
        for i in range(12):
            response = await submit_batch(
                client, run, [samples.otc_confirmation(run, f"DBOUT-DURING-{i:03d}")]
            )
            answers.append(response.status_code)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            read = await client.get(f"/v1/batches/{before.json()['batch_id']}")
            answers.append(read.status_code)
            assert read.status_code == 503
            await asyncio.sleep(2.5)
    finally:
        await asyncio.to_thread(database.start)
    assert pipe.worker_task is not None
    assert not pipe.worker_task.done(), "the worker stopped"
    final = await pipe.wait_final(client, before.json()["batch_id"], timeout=120)
    assert final["counts"] == {"delivered": 300}
    after = await submit_batch(client, run, [samples.otc_confirmation(run, "DBOUT-AFTER-01")])
    assert after.status_code == 202
    assert (await pipe.wait_final(client, after.json()["batch_id"]))["counts"] == {"delivered": 1}
    assert_effects_once(pipe.sim, [m["message_id"] for m in before.json()["messages"]])


async def test_i5_the_worker_outlives_a_35s_broker_stall_and_catches_up(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(worker=False, sim={"latency_ms": 20})
    client = pipe.client()
    run = samples.run_id()
    before = await submit_batch(client, run, samples.mixed_batch(run, 300, prefix="BRKOUT"))
    assert before.status_code == 202
    pipe.infra.broker.pause()
    try:
        await pipe.start_worker()  # a worker starting during the outage waits it out
        await asyncio.sleep(35)
        assert pipe.worker_task is not None
        assert not pipe.worker_task.done()
        refused = await submit_batch(client, run, [samples.otc_confirmation(run, "BRKOUT-DUR")])
        assert refused.status_code == 503
    finally:
        pipe.infra.broker.resume()
    final = await pipe.wait_final(client, before.json()["batch_id"], timeout=180)
    assert final["counts"] == {"delivered": 300}
    assert_effects_once(pipe.sim, [m["message_id"] for m in before.json()["messages"]])


async def test_i5_a_frozen_database_gets_prompt_503s_and_loses_nothing(
    pipeline_factory: PipelineFactory,
) -> None:
    """A stalled database host (every Postgres process stopped, connections open, no answer):
    the intake answers new requests, reads and readiness with a 503 within its database
    timeout instead of holding the desks' connections; what it refused never takes effect;
    what it accepted is delivered once, after the database comes back."""
    pipe: Pipeline = await pipeline_factory(sim={"latency_ms": 5}, database_timeout_s=2.0)
    database = pipe.infra.database
    if database is None:
        pytest.skip("the database server is not ours to freeze (ETRM_TEST_DATABASE_URL)")
    client = pipe.client()
    admin = pipe.client(desk="ops", scopes="ops:read ops:upstream", subject="op-frozen")
    later = datetime.now(UTC) + timedelta(days=1)
    window = {
        "from": iso_z(later),
        "until": iso_z(later + timedelta(hours=1)),
        "reason": f"patch night {uuid.uuid4().hex[:8]}",
    }

    async def windows_named(reason: str) -> int:
        status = await admin.get("/v1/upstream")
        assert status.status_code == 200, status.text
        return sum(w["reason"] == reason for w in status.json()["maintenance"])

    async def refused_window_taken() -> bool:
        return await windows_named(window["reason"]) > 0

    run = samples.run_id()
    before = await submit_batch(client, run, samples.mixed_batch(run, 200, prefix="FRZ"))
    assert before.status_code == 202
    refused: list[dict[str, Any]] = []
    database.pause()
    try:
        for i in range(3):
            record = samples.otc_confirmation(run, f"FRZ-DURING-{i:03d}")
            started = time.monotonic()
            response = await client.post(
                "/v1/settlements/sync", json=record, headers={"X-Settlement-Run-ID": run}
            )
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "ledger_unavailable"
            assert response.headers["retry-after"]
            assert took < 8, f"answered after {took:.1f}s"
            refused.append(record)
        for reader, path in (
            (client, f"/v1/batches/{before.json()['batch_id']}"),
            (pipe.operator(), "/v1/reconciliation"),
        ):
            started = time.monotonic()
            read = await reader.get(path)
            assert read.status_code == 503, read.text
            assert read.json()["code"] == "ledger_unavailable"
            assert time.monotonic() - started < 8
        started = time.monotonic()
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"].startswith("unavailable")
        assert time.monotonic() - started < 5
        # An operator's change: refused as promptly, and (below) never taken in afterwards.
        started = time.monotonic()
        declared = await admin.post("/v1/upstream/maintenance", json=window)
        assert declared.status_code == 503, declared.text
        assert declared.json()["code"] == "ledger_unavailable"
        assert "nothing was changed" in declared.json()["detail"]
        assert time.monotonic() - started < 8
    finally:
        database.resume()

    async def serving() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await wait_for(serving, 30)  # and once the database is back, as before it stalled
    await never(refused_window_taken, 1)
    assert (await admin.post("/v1/upstream/maintenance", json=window)).status_code == 201
    assert await windows_named(window["reason"]) == 1
    final = await pipe.wait_final(client, before.json()["batch_id"], timeout=120)
    assert final["counts"] == {"delivered": 200}
    assert_effects_once(pipe.sim, [m["message_id"] for m in before.json()["messages"]])
    after = await submit_batch(client, run, [samples.otc_confirmation(run, "FRZ-AFTER-01")])
    assert after.status_code == 202
    assert (await pipe.wait_final(client, after.json()["batch_id"]))["counts"] == {"delivered": 1}
    # The desk sends one refused record again, as a 503 invites: the stalled database carried
    # out its first begin when it woke up, and that is released at once (not held as in flight
    # until the sweeper finds the request past its pending lease).
    again, *abandoned = refused
    started = time.monotonic()
    while True:
        retried = await client.post(
            "/v1/settlements/sync", json=again, headers={"X-Settlement-Run-ID": run}
        )
        if retried.status_code == 202:
            break
        assert retried.status_code == 409, retried.text
        assert retried.json()["code"] == "request_in_flight"
        # held until the stalled request's pending lease (8 s here) ran out, without the release
        assert time.monotonic() - started < 5, "the stalled request's key stayed in flight"
        await asyncio.sleep(float(retried.headers["retry-after"]))
    assert retried.json()["message_id"] == message_id("power-east", again)
    await wait_for(lambda: pipe.sim.posts_by_key[retried.json()["message_id"]] > 0, 60)
    assert_effects_once(pipe.sim, [retried.json()["message_id"]])
    # What the stalled database took in after all was never published: never delivered.
    abandoned_ids = {message_id("power-east", record) for record in abandoned}
    await never(lambda: bool(abandoned_ids & set(pipe.sim.posts_by_key)), 3)


_SLOW_TRIGGER = """
CREATE FUNCTION etrm_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$
"""


async def test_an_operators_change_is_cut_off_by_a_stalled_database_only_before_its_commit(
    infra: Infra,
) -> None:
    """An operator's change (here a maintenance window) against a database that stalls:
    frozen while its statement runs, it gives up within its bound and nothing of it is ever
    taken in; frozen while its COMMIT runs, it waits for the answer instead of reporting a
    failure for a change that took effect; on a database that is slow but answering (a lock
    held for longer than the bound) it is not cut off at all. The console's reads, frozen,
    give up within the bound too."""
    database = infra.database
    if database is None:
        pytest.skip("the database server is not ours to freeze (ETRM_TEST_DATABASE_URL)")
    url = await fresh_database(infra)
    engine = make_engine(url)
    ops = UpstreamOperations(engine, timeout_s=2.0)
    actor = operator_actor("op-stall")
    probe = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    later = datetime.now(UTC) + timedelta(days=1)

    async def add(reason: str) -> dict[str, Any]:
        return await ops.add_maintenance(actor, later, later + timedelta(hours=1), reason)

    async def named(reason: str) -> int:
        return int(
            await probe.fetchval(
                "SELECT count(*) FROM maintenance_windows WHERE reason = $1", reason
            )
        )

    async def add_frozen_in(
        trigger: str, reason: str, statement: str
    ) -> asyncio.Task[dict[str, Any]]:
        """Adds a window with `trigger` on the table; freezes the server once the change runs
        `statement` (a LIKE pattern)."""
        await probe.execute(trigger)
        adding = asyncio.create_task(add(reason))
        await wait_for(lambda: running(probe, statement), 10, 0.02)
        database.pause()
        return adding

    try:
        # Slow, not stalled: inserts wait 4 s on a lock; the database answers meanwhile.
        blocker = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await blocker.execute("BEGIN; LOCK TABLE maintenance_windows IN EXCLUSIVE MODE")
            started = time.monotonic()
            slow = asyncio.create_task(add("slow"))
            await asyncio.sleep(4)
            await blocker.execute("COMMIT")
            await asyncio.wait_for(slow, 10)
            assert time.monotonic() - started >= 4
            assert await named("slow") == 1
        finally:
            await blocker.close()

        # Frozen while its statement runs: cut off, and the statement is never committed.
        await probe.execute(_SLOW_TRIGGER)
        mid_statement = await add_frozen_in(
            "CREATE TRIGGER etrm_test_slow_insert BEFORE INSERT ON maintenance_windows "
            "FOR EACH ROW EXECUTE FUNCTION etrm_test_slow()",
            "mid-statement",
            "%INSERT INTO maintenance_windows%",
        )
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mid_statement, 10)
            assert time.monotonic() - started < 6
            # The console's reads give up within the same bound.
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ConsoleReads(engine, timeout_s=2.0).overview(), 10)
            assert time.monotonic() - started < 4
        finally:
            database.resume()

        async def cut_off_window_taken() -> bool:
            return await named("mid-statement") > 0

        await never(cut_off_window_taken, 2)

        # Frozen while its COMMIT runs (a deferred trigger sleeps in it): not cut off.
        await probe.execute("DROP TRIGGER etrm_test_slow_insert ON maintenance_windows")
        committing = await add_frozen_in(
            "CREATE CONSTRAINT TRIGGER etrm_test_slow_commit AFTER INSERT ON "
            "maintenance_windows DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            "EXECUTE FUNCTION etrm_test_slow()",
            "committing",
            "COMMIT%",
        )
        try:
            await asyncio.sleep(4)  # the change's check of the database finds it stalled
            assert not committing.done()
        finally:
            database.resume()
        window = await asyncio.wait_for(committing, 10)
        assert window["reason"] == "committing"
        assert await named("committing") == 1
    finally:
        database.resume()
        await probe.close()
        await engine.dispose()


async def running(probe: asyncpg.Connection, statement: str) -> bool:
    """Another session is running a statement like `statement` (a LIKE pattern) right now."""
    return bool(
        await probe.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query ILIKE $1 AND pid <> pg_backend_pid()",
            statement,
        )
    )
