"""The worker process: a FastStream Kafka broker with one batch subscriber on both lanes, a
publisher to the reconciliation topic, and a small HTTP port for /healthz and /metrics.

Acknowledgement is manual: a polled batch is committed only after every message in it reached a
final state (delivered, held, superseded or dead-lettered — the dead letter acknowledged by the
broker). On an infrastructure error the batch is rewound (nack) and read again; the ledger and
the upstream's Idempotency-Key make the second pass free of second effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import uvicorn
from aiokafka import ConsumerRebalanceListener, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import Consumer, KafkaMessage
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ledger import audit
from ledger.crypto import PayloadCipher
from ledger.db import ensure_schema_current, make_engine
from runtime.bootstrap import WORKER_REQUIRED, EmbeddedServer, upstream_client, upstream_http
from runtime.kafka import all_topics, ensure_topics
from runtime.settings import Settings
from schemas.records import CanonicalRecord
from workers import metrics
from workers.delivery import Forwarder
from workers.offsets import OffsetTracker
from workers.upstream import UpstreamClient

log = structlog.get_logger("etrm.worker")
INFRA_RETRY_DELAY_S = 1.0


def build_broker(settings: Settings) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        request_timeout_ms=max(1000, int(settings.kafka_publish_timeout_s * 1000)),
        logger=None,
    )


def reconciliation_publisher(broker: KafkaBroker, settings: Settings) -> Any:
    return broker.publisher(
        settings.topic_reconciliation,
        title="to_reconciliation",
        description="Dead letters: the original key, value (canonical record) and headers, "
        "plus error.reason/status/message/attempts/first_attempt_at/last_attempt_at and "
        "source.topic/partition/offset (CONTRACT §5).",
        schema=CanonicalRecord,
    )


def max_poll_interval_ms(settings: Settings) -> int:
    # Polling pauses only while the in-flight limit is reached; if every record in flight is
    # waiting out its retry budget, the group must not evict the worker for it.
    budget = settings.upstream_retry_budget_s + settings.upstream_timeout_s * 2 + 60
    return int(budget * 1000)


BatchHandler = Callable[[Any], Awaitable[None]]


class Committer:
    """Commits, per partition, the offsets the forwarder reports as finished; forgets a
    partition when the group takes it away (its new owner re-reads from the last commit)."""

    INTERVAL_S = 0.2

    def __init__(self, offsets: OffsetTracker) -> None:
        self.offsets = offsets
        self.consumer: Any = None

    async def commit(self) -> None:
        ready = self.offsets.committable()
        if not ready or self.consumer is None:
            return
        try:
            await self.consumer.commit(
                {
                    TopicPartition(topic, partition): offset
                    for (topic, partition), offset in ready.items()
                }
            )
            metrics.OFFSET_COMMITS.inc()
        except Exception as exc:  # e.g. a rebalance took the partitions away meanwhile
            log.warning("commit_failed", error=type(exc).__name__)
        await record_lag(self.consumer)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL_S)
            await self.commit()


class ForgetRevoked(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, committer: Committer) -> None:
        self.committer = committer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.committer.commit()  # what is finished is committed before it is handed on
        self.committer.offsets.forget((tp.topic, tp.partition) for tp in revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


def wire_subscriber(
    broker: KafkaBroker,
    settings: Settings,
    process: BatchHandler,
    committer: Committer | None = None,
) -> None:
    subscriber = broker.subscriber(
        *settings.topics,
        batch=True,
        group_id=settings.kafka_group_id,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        max_records=settings.worker_max_records,
        batch_timeout_ms=100,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_ms,
        max_poll_interval_ms=max_poll_interval_ms(settings),
        listener=ForgetRevoked(committer) if committer else None,
        title="on_settlements",
        description="Settlement records from the priority and standard lanes",
    )

    @subscriber
    async def on_settlements(_: list[bytes], message: KafkaMessage, consumer: Consumer) -> None:
        # Manual acknowledgement: offsets are committed by the Committer as records finish,
        # never by FastStream for the whole poll.
        if committer is not None:
            committer.consumer = consumer
        records: Any = message.raw_message
        try:
            await process(records)
        except Exception as exc:
            log.exception(
                "batch_failed_will_reread", error=type(exc).__name__, records=len(records)
            )
            await asyncio.sleep(INFRA_RETRY_DELAY_S)
            with contextlib.suppress(Exception):
                await message.nack()


async def record_lag(consumer: Any) -> None:
    """Consumer lag per partition: the broker's high watermark minus our position."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        with contextlib.suppress(Exception):
            position = await consumer.position(tp)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(highwater - position)


def bind_health_port(settings: Settings) -> socket.socket | None:
    """The metrics/health port; a busy port is logged, never a reason to stop delivering."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.worker_metrics_host, settings.worker_metrics_port))
        # Listen now: with SO_REUSEADDR a second bind can succeed and only listen() finds
        # the port taken, which would otherwise surface later inside the HTTP server.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        log.error(  # noqa: TRY400 - a busy port is a configuration fact, not a crash
            "metrics_port_unavailable",
            port=settings.worker_metrics_port,
            error=str(exc),
            consequence="no /metrics or /healthz on this worker",
        )
        return None
    sock.set_inheritable(True)
    return sock


def health_app(upstream: UpstreamClient) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "upstream_token_valid": upstream.tokens.valid},
        )

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", prometheus)])


async def checkpoint_loop(engine: Any, settings: Settings) -> None:
    """Sign the audit chain's head every ETRM_AUDIT_CHECKPOINT_INTERVAL_S, when a key is set."""
    signer = settings.audit_signer()
    if signer is None:
        return
    while True:
        await asyncio.sleep(settings.audit_checkpoint_interval_s)
        try:
            seq = await audit.write_checkpoint(engine, signer)
            log.info("audit_checkpoint", seq=seq)
        except Exception as exc:
            log.warning("audit_checkpoint_failed", error=type(exc).__name__)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    settings.require(*WORKER_REQUIRED)
    assert settings.database_url is not None
    engine = make_engine(settings.database_url, settings.database_pool_size)
    await ensure_schema_current(engine)
    await ensure_topics(
        settings.kafka_bootstrap_servers, all_topics(settings), settings.kafka_partitions
    )
    http = upstream_http(settings)
    upstream = upstream_client(settings, http)
    broker = build_broker(settings)
    to_reconciliation = reconciliation_publisher(broker, settings)

    async def publish_dead_letter(
        key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        await to_reconciliation.publish(value, key=key, headers={k: v.decode() for k, v in headers})

    forwarder = Forwarder(
        engine=engine,
        upstream=upstream,
        publish_dead_letter=publish_dead_letter,
        signing_keys=dict(settings.signing_keys()),
        concurrency=settings.worker_concurrency,
        drift_threshold=settings.drift_threshold,
        cipher=PayloadCipher(settings.encryption_keyring()),
        max_in_flight=4 * settings.worker_max_records,
    )
    committer = Committer(forwarder.offsets)
    wire_subscriber(broker, settings, forwarder.process, committer)
    forwarder.writer.start()
    if stop is None:  # run as a process: stop on SIGINT/SIGTERM
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    server = EmbeddedServer(
        uvicorn.Config(
            health_app(upstream),
            host=settings.worker_metrics_host,
            port=settings.worker_metrics_port,
            log_level="warning",
            lifespan="off",
        )
    )
    health_socket = bind_health_port(settings)
    http_task = asyncio.create_task(
        server.serve(sockets=[health_socket]) if health_socket else asyncio.sleep(0)
    )
    checkpoints = asyncio.create_task(checkpoint_loop(engine, settings))
    commits = asyncio.create_task(committer.run())
    await broker.start()
    log.info(
        "worker_started",
        topics=list(settings.topics),
        group=settings.kafka_group_id,
        concurrency=settings.worker_concurrency,
    )
    try:
        await stop.wait()
    finally:
        log.info("worker_stopping")
        commits.cancel()
        if committer.consumer is not None:  # stop fetching, finish what is in flight
            with contextlib.suppress(Exception):
                committer.consumer.pause(*committer.consumer.assignment())
        await forwarder.drain(timeout=min(30.0, settings.upstream_timeout_s + 5))
        await forwarder.stop_chains()
        with contextlib.suppress(Exception):
            await committer.commit()
        await broker.stop()
        await forwarder.writer.stop()
        server.should_exit = True
        checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoints
        await http_task
        await http.aclose()
        await engine.dispose()
