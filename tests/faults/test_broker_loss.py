"""A broker that loses its log: Tansu's memory storage after a restart (and, on Apache Kafka,
an unclean leader election or a topic deleted by hand). Records answered 202 whose copies were
on the lost log are still queued in the ledger; once the workers' group has settled everything
the broker holds, the workers publish them again from the ledger — each delivered once, in
order per contract — against a broker of the test's own, restarted empty."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
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

pytestmark = pytest.mark.faults


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
    pipeline_factory: PipelineFactory,
) -> None:
    broker = Broker(free_port(), Path(tempfile.mkdtemp(prefix="etrm-lost-")) / "tansu.log")
    broker.start()
    try:
        pipe: Pipeline = await pipeline_factory(
            worker=False, kafka_bootstrap_servers=broker.bootstrap
        )
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
    finally:
        broker.stop()


async def test_a_lost_replay_copy_is_published_again_as_that_replay(
    pipeline_factory: PipelineFactory,
) -> None:
    """A dead letter replayed by an operator, whose replay copy the broker then lost: it goes
    out again as that replay (`replay_id`, `replay_of`, `replay_count`), and takes effect once."""
    broker = Broker(free_port(), Path(tempfile.mkdtemp(prefix="etrm-lost-")) / "tansu.log")
    broker.start()
    try:
        pipe: Pipeline = await pipeline_factory(
            kafka_bootstrap_servers=broker.bootstrap, sim={"reject_contracts": ["UNBOOKED*"]}
        )
        client = pipe.client()
        run = samples.run_id()
        batch = await accepted(
            client, run, samples.mixed_batch(run, 1, prefix="UNBOOKED"), "to-replay"
        )
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
    finally:
        broker.stop()
