"""The workers' consumer group under the two faults that once stopped all delivery in a chaos
run, on the real broker (Tansu) and real workers:

- a member that leads the group but never hands out partitions holds every other member out:
  the worker must not hang in its start (aiokafka's start waits, unbounded, for an
  assignment), must keep replacing its lane consumers while they are out, and must deliver as
  soon as the group can form;
- a consumer that leaves a group still forming stays its leader for ever in Tansu 0.6: the
  workers' consumers therefore never send LeaveGroup (they are expired after their session).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.protocol.group import HeartbeatRequest, JoinGroupRequest
from prometheus_client import REGISTRY

from runtime.kafka import ensure_topics
from schemas import samples
from tests.conftest import Infra, Pipeline, PipelineFactory, make_settings, submit_batch
from tests.support import assert_effects_once, states, wait_for
from workers.app import build_broker, use_consumer_class

pytestmark = pytest.mark.faults


class GroupSquatter:
    """A client that joins the workers' group first — so the broker makes it the leader — and
    then only heartbeats: it never sends the SyncGroup that would hand out partitions. While it
    lives no other member is assigned anything. `crash()` stops it without a LeaveGroup."""

    def __init__(self, bootstrap: str, group: str, topics: set[str]) -> None:
        self.client = AIOKafkaClient(bootstrap_servers=bootstrap)
        self.group = group
        self.topics = topics
        self.beating: asyncio.Task[None] | None = None

    async def _send(self, node: int, request: Any) -> Any:
        return await self.client.send(node, request, group=ConnectionGroup.COORDINATION)

    async def join(self) -> None:
        await self.client.bootstrap()
        node = await self.client.coordinator_lookup(CoordinationType.GROUP, self.group)
        metadata = RoundRobinPartitionAssignor.metadata(self.topics).encode()
        member, response = "", None
        for _ in range(3):  # the first answer only hands out a member id
            response = await self._send(
                node,
                JoinGroupRequest(
                    self.group,
                    2000,
                    2000,
                    member,
                    None,
                    ConsumerProtocol.PROTOCOL_TYPE,
                    [(RoundRobinPartitionAssignor.name, metadata)],
                ),
            )
            member = response.member_id
            if response.error_code == 0:
                break
        assert response is not None
        assert response.error_code == 0, response
        assert response.leader_id == member, "the squatter must be the first member"
        generation = response.generation_id

        async def beat() -> None:
            while True:
                await self._send(node, HeartbeatRequest(self.group, generation, member))
                await asyncio.sleep(0.4)

        self.beating = asyncio.create_task(beat())

    async def crash(self) -> None:
        if self.beating is not None:
            self.beating.cancel()
            with contextlib.suppress(BaseException):
                await self.beating
        await self.client.close()


def restarts(lane: str) -> float:
    value = REGISTRY.get_sample_value("etrm_worker_consumer_restarts_total", {"lane": lane})
    return value or 0.0


async def test_a_worker_held_out_of_its_group_keeps_replacing_its_consumers_and_catches_up(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(worker=False)
    settings = pipe.settings
    squatter = GroupSquatter(
        settings.kafka_bootstrap_servers, settings.kafka_group_id, set(settings.lanes.values())
    )
    await squatter.join()
    client = pipe.client()
    run = samples.run_id()
    try:
        before = {lane: restarts(lane) for lane in settings.lanes}
        await pipe.start_worker()
        response = await submit_batch(client, run, samples.mixed_batch(run, 12, prefix="SQUAT"))
        assert response.status_code == 202
        batch_id = response.json()["batch_id"]
        # Out of the group from its first second: each lane's consumer is replaced after 20 s
        # out, and again 20 s after that — the watchdog is neither stuck behind the start nor
        # behind a restart whose new consumer cannot join either.
        await wait_for(
            lambda: all(restarts(lane) - before[lane] >= 2 for lane in settings.lanes),
            timeout=75,
            every=0.5,
        )
        assert pipe.worker_task is not None
        assert not pipe.worker_task.done()
        assert set((await states(client, batch_id)).values()) == {"queued"}
        assert pipe.sim.effects == []
    finally:
        await squatter.crash()  # no LeaveGroup: the broker expires it after its session
    final = await pipe.wait_final(client, batch_id, timeout=90)
    assert final["counts"] == {"delivered": 12}
    assert_effects_once(pipe.sim, [m["message_id"] for m in response.json()["messages"]])


async def test_a_group_whose_leader_stops_last_takes_new_members_in(infra: Infra) -> None:
    """Two consumers as the worker builds them; the leader (the first to join) stops after the
    other, as a worker's second lane does when the first joined first. Plain aiokafka consumers
    send LeaveGroup here and Tansu 0.6 then keeps the departed leader: the third consumer is
    never assigned (tried: it waits out the whole bound)."""
    settings = make_settings(infra, database_url="postgresql+asyncpg://unused@127.0.0.1/unused")
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    broker = build_broker(settings)
    await broker.connect()
    try:
        use_consumer_class(broker, settings)
        build = broker.config.broker_config.builder
        topic = settings.topic_standard

        def consumer() -> AIOKafkaConsumer:
            made: AIOKafkaConsumer = build(
                group_id=settings.kafka_group_id,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_ms,
            )
            made.subscribe([topic])
            return made

        leader, other = consumer(), consumer()
        await asyncio.wait_for(leader.start(), 30)
        await asyncio.wait_for(other.start(), 30)
        await wait_for(lambda: len(leader.assignment()) + len(other.assignment()) == 4)
        await other.stop()
        await leader.stop()
        newcomer = consumer()
        started = time.monotonic()
        try:
            await asyncio.wait_for(newcomer.start(), 30)
            await wait_for(lambda: len(newcomer.assignment()) == 4, timeout=30)
        finally:
            await newcomer.stop()
        assert time.monotonic() - started < 30
    finally:
        await broker.stop()
