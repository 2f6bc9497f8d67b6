"""The worker's FastStream wiring (workers/app.py) under FastStream's TestKafkaBroker: a record
published to a lane's topic reaches the delivery pipeline through the raw parser, is delivered
once, and its offset becomes committable; nothing in FastStream acknowledges on its own."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from faststream.kafka import TestKafkaBroker

from ingest.publisher import SettlementPublisher
from ledger.crypto import LaneSealer
from ledger.rows import Actor
from operations.circuit import BreakerConfig
from runtime.settings import WorkerSettings, load
from schemas import samples
from schemas.envelope import header_map
from schemas.states import MessageState
from tests.fakes import Desk, FakeBroker, FakeCircuitStore, FakeLedger, FakeUpstream, taken
from tests.support import wait_for
from workers.app import START_RETRY_S, Lane, build_broker, lane_stuck, make_handler, wire_lane
from workers.breaker import Breaker
from workers.core import Policy
from workers.pipeline import Pipeline
from workers.slots import LaneSlots

KEY = ("k1", b"worker-app-secret")


def settings() -> WorkerSettings:
    return load(
        WorkerSettings,
        database_url="postgresql+asyncpg://unused@localhost/unused",
        upstream_url="http://upstream.invalid",
        upstream_token_url="http://upstream.invalid/token",
        upstream_client_id="c",
        upstream_client_secret="s",
        upstream_signing_secret="x",
        message_signing_keys="k1=worker-app-secret",
        encryption_keys="e1=" + "A" * 43 + "=",
    )


async def test_a_published_record_is_delivered_once_through_the_lane_subscriber() -> None:
    config = settings()
    ledger, upstream = FakeLedger(), FakeUpstream(taken())
    pipeline = Pipeline(
        ledger=ledger,
        upstream=upstream,
        token_errors=(FakeUpstream.Unavailable,),
        policy=Policy(4, 5.0, 0.01, 0.05, Decimal("0.5")),
        signing_keys=dict([KEY]),
        slots=LaneSlots(4, 0.5),
        lanes=config.lanes,
        lease_s=10.0,
        upstream_timeout_s=1.0,
        actor=Actor("worker", "unit"),
        breaker=Breaker(
            FakeCircuitStore(),
            BreakerConfig(20, 30.0, 5.0),
            owner="unit",
            probe_lease_s=2.0,
            announced_outage_s=60.0,
        ),
    )
    broker = build_broker(config)
    lanes = {name: Lane(name, topic, 100) for name, topic in config.lanes.items()}
    for lane in lanes.values():
        wire_lane(broker, config, lane, make_handler(pipeline), None, "unit-worker")
    outbox = FakeBroker()
    desk = Desk(ledger, SettlementPublisher(outbox, config.lanes, LaneSealer(KEY)))
    run = samples.run_id()
    ids = await desk.accept(
        [samples.otc_confirmation(run, "OTC-APP-0001"), samples.canonical(run, "RT-APP-00001")]
    )
    async with TestKafkaBroker(broker) as test_broker:
        for partition, (topic, key, value, headers) in enumerate(outbox.records):
            # The test broker numbers every record offset 0: one partition per record.
            pipeline.assign((topic, partition), 0)
            await test_broker.publish(
                value, topic, key=key, partition=partition, headers=header_map(headers)
            )
        await wait_for(lambda: all(ledger.settled(m) for m in ids), timeout=5, every=0.02)
        points = pipeline.offsets.commit_points()
    await pipeline.stop(2.0)
    assert {ledger.rows[m].state for m in ids} == {MessageState.DELIVERED}
    assert sorted(upstream.posts) == sorted(ids)
    assert points == {(t, p): 1 for p, (t, *_rest) in enumerate(outbox.records)}
    subscribers: list[Any] = [lane.subscriber for lane in lanes.values()]
    assert {s.ack_policy.name for s in subscribers} == {"MANUAL"}


async def test_a_lane_is_replaced_when_its_start_failed_or_it_stays_out_of_its_group() -> None:
    lane = Lane("priority", "t.priority", 8)
    assert lane.out_since is not None
    t0 = lane.out_since

    async def refused() -> None:
        raise ConnectionRefusedError

    lane.starting = asyncio.create_task(refused())
    await asyncio.gather(lane.starting, return_exceptions=True)
    # A start that failed is tried again after a few seconds, not after the out-of-group bound.
    assert lane_stuck(lane, 20.0, t0 + START_RETRY_S - 0.1) is None
    assert lane_stuck(lane, 20.0, t0 + START_RETRY_S) == "start_failed:ConnectionRefusedError"

    lane.starting = asyncio.create_task(asyncio.sleep(3600))  # still waiting for an assignment
    assert lane_stuck(lane, 20.0, t0 + 19.9) is None
    assert lane_stuck(lane, 20.0, t0 + 20.0) == "out_of_group"
    lane.out_since = None  # assigned: a member, whatever its start task says
    assert lane_stuck(lane, 20.0, t0 + 1000) is None
    lane.starting.cancel()


async def test_a_worker_run_as_a_process_freezes_its_start_up_heap(monkeypatch: Any) -> None:
    """`etrm-sync worker` moves what start-up built out of the collector's sight before it
    consumes (runtime.cpu.freeze_heap): its CPU per delivery at 0 ms upstream fell ~15-20 %
    with it. A worker run inside a host process (the tests) leaves the host's collector alone."""
    import signal

    from ops import bootstrap

    order: list[str] = []

    async def parts(_settings: Any) -> str:
        order.append("parts")
        return "parts"

    async def serve(_settings: Any, _parts: Any, _stop: Any, **_kw: Any) -> None:
        order.append("serve")

    monkeypatch.setattr(bootstrap, "worker_parts", parts)
    monkeypatch.setattr(bootstrap, "serve", serve)
    monkeypatch.setattr(bootstrap, "freeze_heap", lambda: order.append("freeze"))
    loop = asyncio.get_running_loop()
    try:
        await bootstrap.run_worker(object())  # type: ignore[arg-type]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert order == ["parts", "freeze", "serve"]
    order.clear()
    await bootstrap.run_worker(object(), asyncio.Event())  # type: ignore[arg-type]
    assert order == ["parts", "serve"]


class _Offsets:
    def __init__(self) -> None:
        self.unsettled = 0
        self.held = 0

    def in_flight(self, _topic: str | None = None) -> int:
        return self.unsettled

    def held_back(self, _topic: str | None = None) -> int:
        return self.held


class _StalledPipeline:
    """What widen_if_stalled reads of the pipeline: unsettled counts, and the copies waiting
    for earlier records of their contracts that the worker has not read."""

    def __init__(self) -> None:
        self.offsets = _Offsets()
        self.absent: dict[tuple[str, str, str], set[str]] = {}

    def waiting_on_absent(self, _longer_than_s: float) -> dict[tuple[str, str, str], set[str]]:
        return self.absent


class _Consumer:
    def __init__(self) -> None:
        self.paused = False

    def assignment(self) -> set[str]:
        return {"tp"}

    def pause(self, *_tps: object) -> None:
        self.paused = True

    def resume(self, *_tps: object) -> None:
        self.paused = False


def test_a_paused_lane_whose_copies_wait_for_records_not_read_reads_on_then_narrows() -> None:
    """Both lanes of both workers paused for good in a 100,000-record settlement run: every
    unsettled copy waited for an earlier record of its contract further along the log."""
    from workers.app import HELD_BACK_FACTOR, STALL_S, apply_backpressure, widen_if_stalled

    pipeline: Any = _StalledPipeline()
    lane = Lane("standard", "t.standard", 8)
    consumer = _Consumer()
    lane.subscriber = type("Sub", (), {"consumer": consumer})()
    pipeline.offsets.unsettled = pipeline.offsets.held = 8
    apply_backpressure(pipeline, lane)
    assert lane.paused
    assert consumer.paused
    now = 1000.0
    assert not widen_if_stalled(pipeline, lane, now)  # the stall starts being timed
    # Waiting only for the upstream (nothing waits for an unread record): it stays paused.
    assert not widen_if_stalled(pipeline, lane, now + STALL_S * 5)
    assert lane.cap == 8
    assert consumer.paused
    # Copies wait for records not read: after STALL_S without a settle it reads on.
    pipeline.absent = {("desk", "C-1", "t.standard"): {"m2"}}
    lane.stalled = (now, 8)
    assert not widen_if_stalled(pipeline, lane, now + STALL_S - 0.1)
    assert widen_if_stalled(pipeline, lane, now + STALL_S)
    assert lane.cap == 16
    assert not consumer.paused
    assert not lane.paused
    # Full again at the wider limit, still stalled: it doubles again, never past the held-back
    # limit that bounds memory.
    later = now + STALL_S
    for _ in range(10):
        pipeline.offsets.unsettled = pipeline.offsets.held = lane.cap
        apply_backpressure(pipeline, lane)
        later += STALL_S
        widen_if_stalled(pipeline, lane, later)
        later += STALL_S
        widen_if_stalled(pipeline, lane, later)
    assert lane.cap == 8 * HELD_BACK_FACTOR
    # A settle resets the stall clock: no widening while records settle.
    lane.cap = 16
    pipeline.offsets.unsettled = pipeline.offsets.held = 16
    apply_backpressure(pipeline, lane)
    widen_if_stalled(pipeline, lane, later)
    for step in range(1, 6):
        pipeline.offsets.unsettled -= 1
        assert not widen_if_stalled(pipeline, lane, later + step * STALL_S)
    # Drained below half its own limit: back to its own limit, and reading.
    pipeline.offsets.unsettled = pipeline.offsets.held = 3
    apply_backpressure(pipeline, lane)
    assert lane.cap == 8
    assert not lane.paused
    assert not consumer.paused
