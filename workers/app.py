"""The worker process: a FastStream Kafka broker with one batch subscriber per lane (so a
standard-lane backlog never stands in front of real-time prices), the delivery pipeline, the
committer, housekeeping, and a small HTTP port for /healthz and /metrics.

Rules kept here:
- acknowledgement is manual (AckPolicy.MANUAL): FastStream never commits; the committer
  commits, per partition, only offsets the pipeline reports settled (workers.offsets);
- the subscriber's handler never waits on anything: it tracks and routes the poll and
  returns, so a rebalance cannot interleave with it; when too many records are unsettled the
  lane's partitions are paused (the consumer keeps polling and heartbeating) and resumed
  once records settle;
- on revocation what is settled is committed first, then the partition's chains stop at their
  next safe point; on assignment tracking restarts at the consumer's position.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.message import FAKE_CONSUMER
from faststream.kafka.message import KafkaMessage as StreamKafkaMessage
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.aio import stop_tasks, until_up
from runtime.kafka import faststream_security
from runtime.servers import EmbeddedServer
from runtime.settings import WorkerSettings
from workers import assignment, metrics
from workers.breaker import Breaker
from workers.pipeline import Pipeline

log = structlog.get_logger("etrm.worker")
COMMIT_INTERVAL_S = 0.2
# Unsettled records a lane may hold before its partitions pause; and, behind one that is
# stuck, settled offsets it may keep in memory.
HELD_BACK_FACTOR = 20
# A lane paused for backpressure that settled nothing for this long, while copies here wait
# for earlier records of their contracts this worker has not read, reads past its limit.
STALL_S = 2.0
WATCHDOG_TICK_S = 1.0
# A lane consumer whose start failed (the broker not answering) is started again after this.
START_RETRY_S = 3.0
# How long a stopping worker waits for each lane's consumer to stop.
LANE_STOP_S = 5.0


def build_broker(settings: WorkerSettings) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        request_timeout_ms=max(1000, int(settings.kafka_publish_timeout_s * 1000)),
        security=faststream_security(settings),
        logger=None,
    )


class StayingConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """A consumer that does not send LeaveGroup when it stops; the group hands its partitions
    on once its session times out (Kafka Streams' default, for the same reason: no rebalance
    storm on restarts).

    Why not leave: Tansu 0.6 (`LeaveGroup` of a group still forming) removes the member but
    keeps it as the group's leader. Every later member is then told to wait for that departed
    leader's assignment, for ever: no worker of the group is assigned a partition again. Any
    graceful stop in which the leader is not the first to go does it (two lanes of one worker
    are enough), and it is what stopped all delivery in a chaos run. A member that just stops
    heartbeating is expired properly, leader included."""

    async def stop(self) -> None:
        coordinator = getattr(self, "_coordinator", None)
        if coordinator is not None:

            async def forget_membership() -> None:
                coordinator.reset_generation()

            coordinator._maybe_leave_group = forget_membership
        await super().stop()


def use_consumer_class(broker: KafkaBroker, settings: WorkerSettings) -> None:
    """Have FastStream build the lanes' consumers as StayingConsumer, unless the settings ask
    for consumers that leave their group on stop (safe on Apache Kafka)."""
    if settings.kafka_leave_group_on_stop:
        return
    config = broker.config.broker_config
    builder = config.builder
    if not (isinstance(builder, partial) and builder.func is AIOKafkaConsumer):
        raise RuntimeError(
            f"FastStream's consumer builder is not what this worker expects: {builder!r}"
        )
    config.builder = partial(StayingConsumer, *builder.args, **builder.keywords)


def max_poll_interval_ms(settings: WorkerSettings) -> int:
    # The handler returns at once; a paused lane still polls. This only bounds a stuck loop.
    return int((settings.upstream_timeout_s * 2 + 300) * 1000)


class Lane:
    """One lane's subscriber and the consumer FastStream made for it."""

    def __init__(self, name: str, topic: str, cap: int) -> None:
        self.name = name
        self.topic = topic
        self.base_cap = cap  # unsettled records before the lane pauses
        self.cap = cap  # the same, or more while it reads past a stall (widen_if_stalled)
        # While paused: since when its unsettled count has not fallen, and that count.
        self.stalled: tuple[float, int] | None = None
        self.subscriber: Any = None
        self.paused = False
        # Since when the lane's consumer has been out of the group (started, or revoked and
        # not assigned again); None while it is a member.
        self.out_since: float | None = time.monotonic()
        # The consumer's start, running in the background: aiokafka's start waits, without a
        # bound, until the group hands it partitions.
        self.starting: asyncio.Task[None] | None = None

    @property
    def consumer(self) -> Any:
        return getattr(self.subscriber, "consumer", None)


class Committer:
    """Commits, per partition, the offsets the pipeline reports settled."""

    def __init__(self, pipeline: Pipeline, lanes: dict[str, Lane]) -> None:
        self.pipeline = pipeline
        self.by_topic = {lane.topic: lane for lane in lanes.values()}

    async def commit(self, points: dict[tuple[str, int], int] | None = None) -> None:
        ready = self.pipeline.offsets.committable() if points is None else points
        if not ready:
            return
        by_lane: dict[str, dict[TopicPartition, int]] = {}
        for (topic, partition), offset in ready.items():
            lane = self.by_topic.get(topic)
            if lane is not None:
                by_lane.setdefault(lane.name, {})[TopicPartition(topic, partition)] = offset
        for name, offsets in by_lane.items():
            consumer = self.by_topic_lane(name).consumer
            if consumer is None:
                continue
            try:
                await consumer.commit(offsets)
                metrics.OFFSET_COMMITS.inc()
            except Exception as exc:  # e.g. a rebalance took the partitions away meanwhile
                log.warning("commit_failed", lane=name, error=type(exc).__name__)
                # Offered again next round: left as it is, a partition whose last records
                # settled would keep a committed offset behind them until more arrived (and
                # housekeeping, seeing the lanes unsettled, would never restore lost records).
                self.pipeline.offsets.commit_again((tp.topic, tp.partition) for tp in offsets)

    def by_topic_lane(self, name: str) -> Lane:
        return next(lane for lane in self.by_topic.values() if lane.name == name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            await self.commit()
            for lane in self.by_topic.values():
                if lane.consumer is not None and (lost := await record_lag(lane.consumer)):
                    await self.read_from_log_start(lane, lost)

    async def read_from_log_start(self, lane: Lane, lost: list[TopicPartition]) -> None:
        """The broker lost the log under these partitions' positions (Tansu restarted on
        memory storage; on Apache Kafka, an unclean leader election). Apache Kafka answers a
        fetch past the end with OFFSET_OUT_OF_RANGE and the consumer starts again from the
        earliest offset, as `auto_offset_reset` says; Tansu 0.6 answers with no records, so
        everything written to the partition again below the old position would be skipped.
        Here the consumer is sent where Kafka's reset would send it, and the pipeline tracks
        the partition from there as a new generation. What is read again and already settled
        the ledger delivers once."""
        log.warning("log_lost_under_position", lane=lane.name, partitions=[str(tp) for tp in lost])
        metrics.LOG_RESETS.inc(len(lost))
        try:
            await lane.consumer.seek_to_beginning(*lost)
        except Exception as exc:  # the next round finds them again
            log.warning("seek_failed", lane=lane.name, error=type(exc).__name__)
            return
        held = lane.consumer.assignment()  # a rebalance may have come in between
        await track_from_position(lane, self.pipeline, [tp for tp in lost if tp in held])


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lane: Lane, pipeline: Pipeline, committer: Committer) -> None:
        self.lane = lane
        self.pipeline = pipeline
        self.committer = committer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        keys = [(tp.topic, tp.partition) for tp in revoked]
        points = self.pipeline.offsets.commit_points()
        # What is settled is committed before the partition is handed on.
        await self.committer.commit({k: v for k, v in points.items() if k in keys})
        self.pipeline.revoke(keys)
        if self.lane.out_since is None:
            self.lane.out_since = time.monotonic()
        log.info("partitions_revoked", lane=self.lane.name, partitions=len(keys))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.lane.paused = False
        await track_from_position(self.lane, self.pipeline, assigned)
        self.lane.out_since = None
        log.info("partitions_assigned", lane=self.lane.name, partitions=len(assigned))


async def track_from_position(lane: Lane, pipeline: Pipeline, partitions: Any) -> None:
    """A new generation of each partition in the pipeline, starting at the consumer's position.
    Nothing of these partitions is handed to the pipeline before their generation is recorded:
    positions are looked up below (awaits), and the fetcher does not wait."""
    consumer = lane.consumer
    with contextlib.suppress(Exception):
        consumer.pause(*partitions)
    for tp in partitions:
        position = 0
        for attempt in range(5):
            try:
                position = await consumer.position(tp)
                break
            except Exception as exc:
                log.warning("position_unknown", partition=str(tp), error=type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
        pipeline.assign((tp.topic, tp.partition), position)
    if not lane.paused:  # a lane paused for backpressure resumes when records settle
        with contextlib.suppress(Exception):
            consumer.resume(*partitions)


async def raw_batch(records: Any, _: Any) -> StreamKafkaMessage:
    """Hand the poll over as it came: FastStream's own parser decodes every header value as
    UTF-8 and fails the whole poll on one odd byte (or a null header); ours never reads them.
    The message is born acknowledged, so nothing in FastStream ever commits for us."""
    first = records[0]
    return StreamKafkaMessage(
        raw_message=records,
        body=[],
        message_id=f"{first.topic}-{first.partition}-{first.offset}",
        consumer=FAKE_CONSUMER,
    )


async def not_decoded(_: Any, __: Any) -> None:
    return None


def wire_lane(
    broker: KafkaBroker,
    settings: WorkerSettings,
    lane: Lane,
    handle: Callable[[Lane, Any], Awaitable[None]],
    listener: ConsumerRebalanceListener | None,
    worker: str,
) -> None:
    subscriber = broker.subscriber(
        lane.topic,
        batch=True,
        group_id=settings.kafka_group_id,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        max_records=settings.worker_max_records,
        batch_timeout_ms=100,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_ms,
        max_poll_interval_ms=max_poll_interval_ms(settings),
        listener=listener,
        # partition p of every lane to one worker (workers.assignment)
        partition_assignment_strategy=assignment.for_worker(worker),
        title=f"on_{lane.name}_lane",
        description=f"Settlement records of the {lane.name} lane",
    )
    lane.subscriber = subscriber

    @subscriber(parser=raw_batch, decoder=not_decoded)
    async def on_settlements(message: KafkaMessage) -> None:
        # The raw records, not decoded bodies: a value that is not a settlement record must
        # still reach the pipeline (and become a dead letter there), never fail the poll.
        await handle(lane, message.raw_message)


def make_handler(pipeline: Pipeline) -> Callable[[Lane, Any], Awaitable[None]]:
    async def handle(lane: Lane, records: Any) -> None:
        # No await in here: the whole poll is tracked and routed before anything else runs.
        seeks = pipeline.accept(records)
        consumer = lane.consumer
        if consumer is None:
            return
        for (topic, partition), offset in seeks.items():
            consumer.seek(TopicPartition(topic, partition), offset)
        if pipeline.untracked:
            held = consumer.assignment()
            for (topic, partition), offset in pipeline.untracked.items():
                tp = TopicPartition(topic, partition)
                if tp in held:  # ours, but its assignment is not recorded yet: read it again
                    log.info("read_before_assignment_recorded", partition=str(tp), offset=offset)
                    consumer.seek(tp, offset)
        apply_backpressure(pipeline, lane)

    return handle


def apply_backpressure(pipeline: Pipeline, lane: Lane) -> None:
    consumer = lane.consumer
    if consumer is None:
        return
    unsettled = pipeline.offsets.in_flight(lane.topic)
    held = pipeline.offsets.held_back(lane.topic)
    held_limit = lane.base_cap * HELD_BACK_FACTOR
    if lane.cap > lane.base_cap and unsettled < lane.base_cap // 2:
        lane.cap = lane.base_cap  # drained: back to its own limit
    full = unsettled >= lane.cap or held >= held_limit
    if full and not lane.paused:
        consumer.pause(*consumer.assignment())
        lane.paused = True
        metrics.LANE_PAUSED.labels(lane.name).set(1)
    elif lane.paused and unsettled < lane.cap // 2 and held < held_limit // 2:
        _resume(lane)


def _resume(lane: Lane) -> None:
    consumer = lane.consumer
    if consumer is not None:
        consumer.resume(*consumer.assignment())
    lane.paused = False
    lane.stalled = None
    metrics.LANE_PAUSED.labels(lane.name).set(0)


def widen_if_stalled(pipeline: Pipeline, lane: Lane, now: float) -> bool:
    """A lane paused for backpressure can stall for good: each of its unsettled copies waits
    for an earlier record of its contract that this worker has not read — one a request
    accepted at the same time published after later ones (further along the same partition),
    or one behind a backlog on the other lane, itself paused the same way. Measured: a
    100,000-record settlement run from 4 clients delivered 46,488 records in 33 s, then none,
    both lanes of both workers paused. Such a lane reads on: once it has settled nothing for
    STALL_S while copies here wait for records not read, its limit doubles (up to the held-back
    limit, which bounds memory), and it is back to its own limit once it drains. Copies held
    by the circuit breaker (the upstream away) do not count: they wait for the upstream, and
    reading more would only hold more in memory. True when it widened the lane."""
    if not lane.paused:
        lane.stalled = None
        return False
    unsettled = pipeline.offsets.in_flight(lane.topic)
    since, seen = lane.stalled or (now, unsettled)
    if unsettled < seen:
        since = now  # something settled
    lane.stalled = (since, unsettled)
    ceiling = lane.base_cap * HELD_BACK_FACTOR
    if now - since < STALL_S or lane.cap >= ceiling or not pipeline.waiting_on_absent(STALL_S):
        return False
    if pipeline.offsets.held_back(lane.topic) >= ceiling:
        return False  # memory's bound, not the lane's limit, holds it
    lane.cap = min(ceiling, lane.cap * 2)
    log.warning("lane_reads_past_a_stall", lane=lane.name, unsettled=unsettled, limit=lane.cap)
    metrics.LANE_WIDENED.labels(lane.name).inc()
    _resume(lane)
    return True


async def widen_stalled_lanes(pipeline: Pipeline, lanes: dict[str, Lane]) -> None:
    while True:
        await asyncio.sleep(WATCHDOG_TICK_S)
        now = time.monotonic()
        for lane in lanes.values():
            widen_if_stalled(pipeline, lane, now)


async def resume_when_settled(pipeline: Pipeline, lanes: dict[str, Lane]) -> None:
    while True:
        await pipeline.settled.wait()
        pipeline.settled.clear()
        for lane in lanes.values():
            if lane.paused:
                apply_backpressure(pipeline, lane)
        await asyncio.sleep(0.05)


def start_lane(lane: Lane) -> None:
    """Start the lane's consumer in the background and restart its out-of-group clock.

    The start is never awaited by the caller: aiokafka's `start()` returns only once the group
    has assigned partitions, and a group that never forms (a broker stalled mid-rebalance, or
    a member that leads the group but never syncs) would hold the worker — and this lane's
    watchdog — for ever. Seen in a chaos run: a worker stuck in its first start, another stuck
    restarting a lane, and the whole group delivering nothing until the end."""
    lane.out_since = time.monotonic()
    lane.starting = asyncio.create_task(lane.subscriber.start(), name=f"start_{lane.name}_lane")


async def stop_lane(lane: Lane, timeout_s: float) -> None:
    """Stop the lane's consumer, whatever state its start is in (still joining included)."""
    starting, lane.starting = lane.starting, None
    if starting is not None:  # its failure, if it failed, is why we are here, or moot
        await stop_tasks([starting], timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            await lane.subscriber.stop()
    except Exception as exc:
        log.warning("lane_consumer_stop_failed", lane=lane.name, error=type(exc).__name__)


def lane_stuck(lane: Lane, stuck_after_s: float, now: float) -> str | None:
    """Why the lane's consumer must be replaced now, or None.

    A start that failed (the broker not answering yet) is retried after a few seconds; a
    consumer out of its group (never assigned, or revoked and not assigned again) for
    `stuck_after_s` is replaced, so a group wedged by one of its members re-forms without it."""
    if lane.out_since is None:
        return None
    out_for = now - lane.out_since
    starting = lane.starting
    if starting is not None and starting.done() and not starting.cancelled():
        failure = starting.exception()
        if failure is not None and out_for >= min(stuck_after_s, START_RETRY_S):
            return f"start_failed:{type(failure).__name__}"
    return "out_of_group" if out_for >= stuck_after_s else None


async def rejoin_watchdog(
    pipeline: Pipeline, lanes: dict[str, Lane], session_timeout_ms: int
) -> None:
    """Replaces the consumer of any lane that stays out of its group (seen after a broker
    stall: a SyncGroup that timed out leaves aiokafka's coordinator waiting for nothing, and
    under Tansu a member that leads the group but never syncs holds every other member out),
    so the worker catches up by itself once the broker answers again. Each lane is restarted
    in a task of its own: one lane's slow stop never delays another's."""
    stuck_after = max(20.0, 10 * session_timeout_ms / 1000)
    restarting: dict[str, asyncio.Task[None]] = {}

    async def restart(lane: Lane, why: str) -> None:
        log.warning("lane_out_of_group_restarting_consumer", lane=lane.name, reason=why)
        metrics.CONSUMER_RESTARTS.labels(lane.name).inc()
        pipeline.revoke(
            [key for key in list(pipeline.offsets.partitions()) if key[0] == lane.topic]
        )
        await stop_lane(lane, 30.0)
        start_lane(lane)

    try:
        while True:
            await asyncio.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            for lane in lanes.values():
                busy = restarting.get(lane.name)
                if busy is not None and not busy.done():
                    continue
                why = lane_stuck(lane, stuck_after, now)
                if why is not None:
                    restarting[lane.name] = asyncio.create_task(restart(lane, why))
    finally:  # the worker is stopping: it stops every lane itself
        for task in restarting.values():
            task.cancel()
        await asyncio.gather(*restarting.values(), return_exceptions=True)


async def record_lag(consumer: Any) -> list[TopicPartition]:
    """Consumer lag per partition: the broker's high watermark minus our position. Returns the
    partitions whose position is past the high watermark: a position only ever comes from
    records the broker returned, so the log behind it is gone."""
    lost = []
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        with contextlib.suppress(Exception):
            # position() waits (request after request) for a position the broker has not
            # answered yet; the committer that calls this must not wait with it. A timeout
            # block, not wait_for: wait_for (Python 3.11) could drop the committer's own
            # cancellation when the position came back in the same instant.
            async with asyncio.timeout(1.0):
                position = await consumer.position(tp)
            if position > highwater:
                lost.append(tp)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )
    return lost


def bind_health_port(host: str, port: int) -> socket.socket | None:
    """The metrics/health port; a busy port is logged, never a reason to stop delivering."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listen now: with SO_REUSEADDR a second bind can succeed and only listen() finds
        # the port taken, which would otherwise surface later inside the HTTP server.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        log.error(  # noqa: TRY400 - a busy port is a configuration fact, not a crash
            "metrics_port_unavailable",
            port=port,
            error=str(exc),
            consequence="no /metrics or /healthz on this worker",
        )
        return None
    sock.set_inheritable(True)
    return sock


def health_app(
    token_valid: Callable[[], bool],
    metrics_allowed: Callable[[str | None], bool] = lambda _: True,
) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "upstream_token_valid": token_valid()})

    async def prometheus(request: Request) -> Response:
        if not metrics_allowed(request.headers.get("authorization")):
            return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", prometheus)])


@dataclass
class WorkerParts:
    """Everything a worker runs, built by the composition root (ops.bootstrap)."""

    pipeline: Pipeline
    breaker: Breaker
    housekeeping: Any  # operations.housekeeping.Housekeeping
    token_valid: Callable[[], bool]
    close: Callable[[], Awaitable[None]]


async def serve(
    settings: WorkerSettings,
    parts: WorkerParts,
    stop: asyncio.Event,
    *,
    transient: Callable[[BaseException], bool] = lambda _: False,
) -> None:
    pipeline = parts.pipeline
    cap = max(1, 4 * settings.worker_max_records)
    lanes = {name: Lane(name, topic, cap) for name, topic in settings.lanes.items()}
    committer = Committer(pipeline, lanes)
    broker = build_broker(settings)
    handle = make_handler(pipeline)
    for lane in lanes.values():
        listener = Rebalance(lane, pipeline, committer)
        wire_lane(broker, settings, lane, handle, listener, pipeline.actor.name)
    server = EmbeddedServer(
        uvicorn.Config(
            health_app(parts.token_valid, settings.metrics_allowed),
            host=settings.worker_metrics_host,
            port=settings.worker_metrics_port,
            log_level="warning",
            lifespan="off",
            http="h11",  # as installed in production (httptools is a dev tool's parser only)
        )
    )
    health_socket = bind_health_port(settings.worker_metrics_host, settings.worker_metrics_port)
    http_task = asyncio.create_task(
        server.serve(sockets=[health_socket]) if health_socket else asyncio.sleep(0)
    )
    parts.housekeeping.start()
    parts.breaker.start()
    log.info("worker_starting", step="joining the consumer group")
    await until_up("broker", broker.connect, transient=transient)
    use_consumer_class(broker, settings)
    # Each lane's consumer starts in the background, watched from the first second: joining
    # the group has no bound of its own (see start_lane).
    for lane in lanes.values():
        start_lane(lane)
    broker.running = True
    background = [
        asyncio.create_task(committer.run(), name="committer"),
        asyncio.create_task(resume_when_settled(pipeline, lanes), name="resume"),
        asyncio.create_task(widen_stalled_lanes(pipeline, lanes), name="widen"),
        asyncio.create_task(
            rejoin_watchdog(pipeline, lanes, settings.kafka_session_timeout_ms), name="watchdog"
        ),
    ]
    log.info(
        "worker_started",
        topics=list(settings.lanes.values()),
        group=settings.kafka_group_id,
        concurrency=settings.worker_concurrency,
    )
    try:
        await stop.wait()
    finally:
        log.info("worker_stopping")
        for lane in lanes.values():  # stop fetching, settle what is in flight
            if lane.consumer is not None:
                with contextlib.suppress(Exception):
                    lane.consumer.pause(*lane.consumer.assignment())
        await pipeline.stop(timeout=min(30.0, settings.upstream_timeout_s + 5))
        with contextlib.suppress(Exception):
            await committer.commit(pipeline.offsets.commit_points())
        await stop_tasks(background)
        # One lane at a time (FastStream would stop them concurrently); where LeaveGroup is
        # sent at all (ETRM_KAFKA_LEAVE_GROUP_ON_STOP), one member leaves at a time.
        # Bounded: a consumer still joining can take long to stop, and nothing is lost by not
        # waiting for it (offsets are committed above; the group expires it either way).
        for lane in lanes.values():
            await stop_lane(lane, LANE_STOP_S)
        await broker.stop()
        await parts.breaker.stop()
        await parts.housekeeping.stop()
        server.should_exit = True
        await http_task
        await parts.close()
