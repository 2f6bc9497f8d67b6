"""A broker that loses its log: Tansu's memory storage after a restart (and, on Apache Kafka,
an unclean leader election or a topic deleted by hand). Records answered 202 whose copies were
on the lost log are still queued in the ledger; once the workers' group has settled everything
the broker holds, the workers publish them again from the ledger — each delivered once, in
order per contract — against a broker of the test's own, restarted empty."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import text

from ledger.db import make_engine
from ops.dev.stack import Broker, free_port
from runtime.kafka import ensure_topics
from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import (
    assert_contract_order,
    assert_effects_once,
    headers_of,
    read_topic,
    wait_for,
)
from workers.app import Committer, Lane, record_lag

pytestmark = pytest.mark.faults


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A Tansu of the test's own. Asked for before `pipeline_factory`, so it stops after the
    pipeline: a worker stopping against a broker that is gone waits out its timeouts."""
    broker = Broker(free_port(), Path(tempfile.mkdtemp(prefix="etrm-lost-")) / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


async def accepted(
    client: httpx.AsyncClient, run: str, records: list[dict[str, Any]], key: str
) -> dict[str, Any]:
    """202 for the batch; a 503 (the broker not answering yet) is sent again with its key."""
    for _ in range(20):
        answer = await submit_batch(client, run, records, key=key)
        if answer.status_code == 202:
            body: dict[str, Any] = answer.json()
            return body
        assert answer.status_code == 503, answer.text
        await asyncio.sleep(0.5)
    raise AssertionError("the batch was never accepted")


async def republished(pipe: Pipeline) -> dict[str, int]:
    engine = make_engine(pipe.settings.database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT message_id, count(*) FROM audit_log "
                    "WHERE action = 'message.republished' GROUP BY message_id"
                )
            )
            return {r[0]: int(r[1]) for r in rows}
    finally:
        await engine.dispose()


async def test_records_on_a_lost_log_are_published_again_and_delivered_once(
    broker: Broker, pipeline_factory: PipelineFactory
) -> None:
    pipe: Pipeline = await pipeline_factory(worker=False, kafka_bootstrap_servers=broker.bootstrap)
    client = pipe.client()
    run = samples.run_id()
    lost = samples.mixed_batch(run, 24, contracts=4, prefix="LOST")
    first = await accepted(client, run, lost, "before-the-restart")

    # The broker restarts empty: the batch's copies are gone, the ledger has them queued.
    broker.stop()
    broker.start()
    settings = pipe.settings
    await ensure_topics(broker.bootstrap, settings.all_topics, settings.kafka_partitions)
    kept = samples.mixed_batch(run, 12, contracts=3, prefix="KEPT")
    second = await accepted(client, run, kept, "after-the-restart")

    await pipe.start_worker()
    for batch in (first, second):
        final = await pipe.wait_final(client, batch["batch_id"], timeout=90)
        assert final["counts"] == {"delivered": len(batch["messages"])}, final["counts"]

    lost_ids = [m["message_id"] for m in first["messages"]]
    kept_ids = [m["message_id"] for m in second["messages"]]
    assert_effects_once(pipe.sim, lost_ids + kept_ids)
    # One POST each: nothing was published again that the broker still held.
    assert {m: pipe.sim.posts_by_key[m] for m in lost_ids + kept_ids} == dict.fromkeys(
        lost_ids + kept_ids, 1
    )
    assert_contract_order(pipe.sim, {m: i for i, m in enumerate(lost_ids + kept_ids)})
    again = await republished(pipe)
    assert set(again) == set(lost_ids), again


async def test_records_waiting_behind_a_lost_record_of_their_contract_get_it_back(
    broker: Broker, pipeline_factory: PipelineFactory
) -> None:
    """Records accepted after the log was lost, of the same contracts as records lost with
    it. Each waits for the lost records of its contract, so the group never commits past it
    and the lanes never read as settled — which is what restoring the lost records waited
    for: nothing was delivered again (seen in a chaos run with broker restarts: hundreds of
    records queued for good). A copy that waits that long for an earlier record this worker
    does not hold has its contract's queued records published again."""
    pipe: Pipeline = await pipeline_factory(worker=False, kafka_bootstrap_servers=broker.bootstrap)
    client = pipe.client()
    run = samples.run_id()
    records = samples.mixed_batch(run, 24, contracts=3, prefix="WAITED")
    first = await accepted(client, run, records[:12], "lost-with-the-log")

    broker.stop()
    broker.start()
    settings = pipe.settings
    await ensure_topics(broker.bootstrap, settings.all_topics, settings.kafka_partitions)
    second = await accepted(client, run, records[12:], "same-contracts-after")

    await pipe.start_worker()
    for batch in (first, second):
        final = await pipe.wait_final(client, batch["batch_id"], timeout=90)
        assert final["counts"] == {"delivered": len(batch["messages"])}, final["counts"]
    ids = [m["message_id"] for batch in (first, second) for m in batch["messages"]]
    assert_effects_once(pipe.sim, ids)
    assert {m: pipe.sim.posts_by_key[m] for m in ids} == dict.fromkeys(ids, 1)
    assert_contract_order(pipe.sim, {m: i for i, m in enumerate(ids)})
    lost_ids = {m["message_id"] for m in first["messages"]}
    assert set(await republished(pipe)) == lost_ids


async def test_a_lost_replay_copy_is_published_again_as_that_replay(
    broker: Broker, pipeline_factory: PipelineFactory
) -> None:
    """A dead letter replayed by an operator, whose replay copy the broker then lost: it goes
    out again as that replay (`replay_id`, `replay_of`, `replay_count`), and takes effect once."""
    pipe: Pipeline = await pipeline_factory(
        kafka_bootstrap_servers=broker.bootstrap, sim={"reject_contracts": ["UNBOOKED*"]}
    )
    client = pipe.client()
    run = samples.run_id()
    batch = await accepted(client, run, samples.mixed_batch(run, 1, prefix="UNBOOKED"), "to-replay")
    final = await pipe.wait_final(client, batch["batch_id"])
    assert final["counts"] == {"dead_lettered": 1}, final["counts"]
    message_id = batch["messages"][0]["message_id"]

    await pipe.stop_worker()
    pipe.sim.config.reject_contracts = []  # booked at the ETRM now
    ops = pipe.operator()
    [dead] = (await ops.get("/v1/reconciliation")).json()["items"]
    replay = await ops.post(
        "/v1/reconciliation/replay", json={"message_ids": [message_id], "reason": "booked"}
    )
    assert replay.status_code == 202, replay.text
    replay_id = replay.json()["replay_id"]

    async def published() -> bool:
        status = (await ops.get(f"/v1/reconciliation/replay/{replay_id}")).json()
        return bool(status["state"] == "completed")

    await wait_for(published)
    broker.stop()  # the replay's copy is lost with the log
    broker.start()
    settings = pipe.settings
    await ensure_topics(broker.bootstrap, settings.all_topics, settings.kafka_partitions)

    await pipe.start_worker()
    final = await pipe.wait_final(client, batch["batch_id"], timeout=90)
    assert final["counts"] == {"delivered": 1}, final["counts"]
    assert_effects_once(pipe.sim, [message_id])
    assert pipe.sim.posts_by_key[message_id] == 2  # refused once, then the replay
    copies = [
        headers_of(r)
        for topic in settings.lanes.values()
        for r in await read_topic(broker.bootstrap, topic)
    ]
    assert len(copies) == 1, copies
    assert {k: copies[0].get(k) for k in ("message_id", "replay_id", "replay_of")} == {
        "message_id": message_id,
        "replay_id": replay_id,
        "replay_of": dead["dead_letter_id"],
    }
    assert copies[0]["replay_count"] == "1"
    assert await republished(pipe) == {message_id: 1}


async def test_a_broker_restarted_under_connected_clients_loses_nothing_accepted_after(
    broker: Broker, pipeline_factory: PipelineFactory
) -> None:
    """The intake and the worker stay connected while the broker restarts empty, and records
    are sent at once. The intake's producer still names the lanes (cached metadata), and Tansu
    0.6 acknowledges a produce to a topic it no longer has; creating the topic afterwards set
    its offsets back over those records, which then could not be read and made later produces
    fail. The worker's consumer still sits at its old positions, past the new log's end, and
    Tansu answers a fetch there with nothing (Apache Kafka: OFFSET_OUT_OF_RANGE). Every record
    accepted after the restart is delivered once, and the intake keeps accepting."""
    pipe: Pipeline = await pipeline_factory(kafka_bootstrap_servers=broker.bootstrap)
    client = pipe.client()
    run = samples.run_id()
    before = await accepted(client, run, samples.mixed_batch(run, 12, prefix="BEFORE"), "b")
    final = await pipe.wait_final(client, before["batch_id"])
    assert final["counts"] == {"delivered": 12}, final["counts"]

    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.start)  # no topics: the clients must cope on their own
    # The broker listens again: each record is accepted at the first try, none refused
    # because a lane's partition no longer takes records.
    answers = [
        await submit_batch(client, run, samples.mixed_batch(run, 1, prefix=f"AFTER{i}"))
        for i in range(16)
    ]
    assert [a.status_code for a in answers] == [202] * 16, [a.text for a in answers]

    ids = []
    for batch in [a.json() for a in answers]:
        final = await pipe.wait_final(client, batch["batch_id"], timeout=60)
        assert final["counts"] == {"delivered": len(batch["messages"])}, final["counts"]
        ids += [m["message_id"] for m in batch["messages"]]
    assert_effects_once(pipe.sim, ids)
    assert {m: pipe.sim.posts_by_key[m] for m in ids} == dict.fromkeys(ids, 1)
    assert_contract_order(pipe.sim, {m: i for i, m in enumerate(ids)})


class Generations:
    """Records where the committer starts each partition's new generation (the pipeline's
    `assign`), as the offset tracker would take it."""

    def __init__(self) -> None:
        self.started: list[tuple[tuple[str, int], int]] = []

    def assign(self, partition: tuple[str, int], position: int) -> None:
        self.started.append((partition, position))


async def test_a_consumer_past_the_end_of_a_lost_log_reads_it_again_from_its_start(
    broker: Broker,
) -> None:
    """A worker's consumer whose position is past what a restarted broker holds: Tansu answers
    its fetches with nothing, so records written again from offset 0 would be skipped until the
    log grew past the old position. The committer's round sees it and starts the partition over
    from the log's start, as Apache Kafka's OFFSET_OUT_OF_RANGE reset would."""
    topic, tp = "lost-log", TopicPartition("lost-log", 0)

    async def produce(count: int) -> None:
        await ensure_topics(broker.bootstrap, [topic], 1)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(count):
                await producer.send_and_wait(topic, b"v%d" % i, key=b"k", partition=0)
        finally:
            await producer.stop()

    async def read(consumer: AIOKafkaConsumer) -> list[int]:
        got: list[int] = []
        for _ in range(6):
            polled = await consumer.getmany(timeout_ms=300)
            got += [r.offset for records in polled.values() for r in records]
        return got

    await produce(5)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        assert await read(consumer) == [0, 1, 2, 3, 4]

        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        await produce(3)  # offsets 0..2 of the new log, under the consumer's position 5
        assert await read(consumer) == []  # Tansu: no records, and no error
        assert await record_lag(consumer) == [tp]

        lane = Lane("standard", topic, cap=100)
        lane.subscriber = SimpleNamespace(consumer=consumer)
        generations = Generations()
        committer = Committer(cast(Any, generations), {"standard": lane})
        await committer.read_from_log_start(lane, [tp])
        assert generations.started == [((topic, 0), 0)]
        assert await read(consumer) == [0, 1, 2]
        assert await record_lag(consumer) == []
    finally:
        await consumer.stop()
