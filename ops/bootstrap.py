"""The one composition root: real adapters (database engine, Kafka, JWKS verifier, upstream
client) built from each process's settings and handed to the intake, the worker and the
operator's commands ready-made. Nothing else builds them, and nothing imports this module but
the command line and the tools that start processes (tests, dev stack, bench)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Callable, Collection, Mapping

import structlog
from aiokafka.errors import KafkaError
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.app import create_app
from ingest.auth import JwksKeys, TokenVerifier
from ingest.deps import IntakeServices
from ingest.limits import DeskRateLimiter, FailureAlarm
from ingest.preparing import prepare_batch_body
from ingest.publisher import SettlementPublisher
from ingest.waiting import WaitingWatch
from ledger.acceptance import IntakeStore
from ledger.console import ConsoleReads
from ledger.crypto import LaneSealer, PayloadCipher
from ledger.db import database_unavailable, ensure_schema_current, make_engine
from ledger.delivery import DeliveryStore
from ledger.rows import Actor
from ledger.upstream import CircuitStore
from operations.circuit import BreakerConfig
from operations.housekeeping import Housekeeping, Intervals
from operations.publishing import Republisher
from operations.service import Operations
from runtime.aio import until_up
from runtime.cpu import freeze_heap, use_processes, warm_processes
from runtime.kafka import KafkaPublisher, LaneLog, ensure_topics
from runtime.settings import (
    IntakeSettings,
    KafkaSettings,
    OperatorSettings,
    WorkerSettings,
    load,
)
from workers import metrics
from workers.app import WorkerParts, serve
from workers.breaker import Breaker
from workers.core import Policy
from workers.pipeline import LEASE_MARGIN_S, Pipeline
from workers.slots import LaneSlots
from workers.upstream import HttpPool, TokenProvider, TokenUnavailable, UpstreamClient

log = structlog.get_logger("etrm.startup")


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _topics(settings: KafkaSettings) -> None:
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        settings.all_topics,
        settings.kafka_partitions,
        security=settings,
    )


def kafka_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError | OSError | TimeoutError)


async def _schema_current(engine: AsyncEngine) -> None:
    await until_up(
        "database", lambda: ensure_schema_current(engine), transient=database_unavailable
    )


def _housekeeping(
    settings: IntakeSettings | WorkerSettings | OperatorSettings,
    engine: object,
    cipher: PayloadCipher,
    kafka: KafkaPublisher,
    republisher: Republisher,
    actor: Actor,
    lanes: LaneLog | None = None,
    published_again: Callable[[int], object] | None = None,
    waiting: Callable[[float], Mapping[tuple[str, str, str], Collection[str]]] | None = None,
) -> Housekeeping:
    return Housekeeping(
        engine=engine,  # type: ignore[arg-type]
        cipher=cipher,
        publisher=kafka,
        republisher=republisher,
        reconciliation_topic=settings.topic_reconciliation,
        actor=actor,
        audit_signer=settings.audit_signer(),
        intervals=Intervals(checkpoint_s=settings.audit_checkpoint_interval_s),
        key_retention_s=settings.idempotency_retention_h * 3600,
        checkpoint_dir=settings.checkpoint_dir(),
        lanes=lanes,
        published_again=published_again,
        waiting=waiting,
    )


def lane_sealer(
    settings: IntakeSettings | WorkerSettings | OperatorSettings, cipher: PayloadCipher
) -> LaneSealer:
    """How a process puts record values on the lanes: signed with the first signing key, sealed
    with the process's payload cipher when ETRM_KAFKA_ENCRYPT_PAYLOADS is on."""
    return LaneSealer(
        settings.signing_keys()[0], cipher if settings.kafka_encrypt_payloads else None
    )


# -- intake ---------------------------------------------------------------------------------

# What the intake's worker processes run (a big batch's preparation), imported as each starts.
BATCH_CODE = (prepare_batch_body.__module__,)


async def intake_services(settings: IntakeSettings) -> IntakeServices:
    use_processes(settings.intake_cpu_processes, preload=BATCH_CODE)
    idle_s = settings.database_idle_in_transaction_s
    engine = make_engine(
        settings.database_url, settings.database_pool_size, idle_in_transaction_s=idle_s
    )
    await _schema_current(engine)
    reads = make_engine(
        settings.database_url,
        max(2, settings.database_pool_size // 4),
        custom_plans=True,
        idle_in_transaction_s=idle_s,
    )
    # The broker may come later; /readyz reports it meanwhile and the worker creates topics too.
    with contextlib.suppress(Exception):
        await _topics(settings)
    kafka = KafkaPublisher(settings)
    await kafka.start()
    cipher = PayloadCipher(settings.encryption_keyring())
    sealer = lane_sealer(settings, cipher)
    republisher = Republisher(engine, kafka, cipher, sealer)
    actor = Actor("system", f"intake {process_name()}")
    default_rate, desk_rates = settings.desk_rates()
    ledger = IntakeStore(engine, cipher, reads, timeout_s=settings.database_timeout_s)
    return IntakeServices(
        settings=settings,
        ledger=ledger,
        kafka=kafka,
        publisher=SettlementPublisher(kafka, settings.lanes, sealer),
        verifier=TokenVerifier(
            JwksKeys(settings.jwks_url, cooldown_s=settings.jwks_refresh_cooldown_s),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_s=settings.jwt_leeway_s,
        ),
        operations=Operations(
            engine,
            cipher,
            republisher,
            approval_threshold=settings.replay_approval_threshold,
            timeout_s=settings.database_timeout_s,
        ),
        rate_limiter=DeskRateLimiter(default_rate, desk_rates),
        record_limiter=DeskRateLimiter(*settings.desk_record_rates(), unit="record"),
        waiting=WaitingWatch(ledger.upstream_view),
        alarm=FailureAlarm(),
        housekeeping=_housekeeping(settings, engine, cipher, kafka, republisher, actor),
        console=ConsoleReads(engine, timeout_s=settings.database_timeout_s),
        close=lambda: _close_intake(kafka, engine, reads),
    )


async def _close_intake(kafka: KafkaPublisher, *engines: AsyncEngine) -> None:
    await kafka.stop()
    for engine in engines:
        await engine.dispose()


def intake_app(settings: IntakeSettings, *, warm: bool = False) -> FastAPI:
    """The intake's app; `warm` (a served intake) starts the worker processes for big batches
    now rather than on the first big batch."""
    if warm:
        use_processes(settings.intake_cpu_processes, preload=BATCH_CODE)
        warm_processes()

    async def build() -> IntakeServices:
        return await intake_services(settings)

    return create_app(
        build, body_limit=settings.max_body_bytes, body_timeout_s=settings.body_read_timeout_s
    )


def intake_app_from_env() -> FastAPI:
    """The app of one intake process among several (`etrm-sync intake --processes N`): each
    reads its settings from the environment, as the first did."""
    from runtime.logging import configure_logging
    from runtime.tracing import setup_tracing

    configure_logging("intake")
    setup_tracing("intake")
    return intake_app(load(IntakeSettings), warm=True)


# -- worker ---------------------------------------------------------------------------------


def upstream_http(settings: WorkerSettings) -> HttpPool:
    return HttpPool(settings.worker_concurrency, settings.upstream_timeout_s)


def upstream_client(settings: WorkerSettings, http: HttpPool) -> UpstreamClient:
    tokens = TokenProvider(
        http,
        settings.upstream_token_url,
        settings.upstream_client_id,
        settings.upstream_client_secret.get_secret_value(),
    )
    return UpstreamClient(
        http,
        tokens,
        base_url=settings.upstream_url,
        signing_secret=settings.upstream_signing_secret.get_secret_value(),
    )


def delivery_policy(settings: WorkerSettings) -> Policy:
    return Policy(
        max_attempts=settings.upstream_max_attempts,
        budget_s=settings.upstream_retry_budget_s,
        backoff_base_s=settings.upstream_backoff_base_s,
        backoff_cap_s=settings.upstream_backoff_cap_s,
        drift_threshold=settings.drift_threshold,
        sequencing=settings.sequence_dead_letters,
    )


def breaker_config(settings: WorkerSettings) -> BreakerConfig:
    return BreakerConfig(
        failures=settings.breaker_failures,
        window_s=settings.breaker_window_s,
        probe_interval_s=settings.breaker_probe_interval_s,
    )


async def worker_parts(settings: WorkerSettings) -> WorkerParts:
    engine = make_engine(
        settings.database_url,
        settings.database_pool_size,
        idle_in_transaction_s=settings.database_idle_in_transaction_s,
    )
    log.info("worker_starting", step="database schema")
    await _schema_current(engine)
    log.info("worker_starting", step="topics")
    await until_up("broker", lambda: _topics(settings), transient=kafka_unavailable)
    cipher = PayloadCipher(settings.encryption_keyring())
    kafka = KafkaPublisher(settings)
    republisher = Republisher(engine, kafka, cipher, lane_sealer(settings, cipher))
    owner = f"{process_name()}/{uuid.uuid4().hex[:6]}"  # unique per worker, also in one process
    actor = Actor("worker", owner)
    http = upstream_http(settings)
    upstream = upstream_client(settings, http)
    breaker = Breaker(
        CircuitStore(engine, actor),
        breaker_config(settings),
        owner=owner,
        probe_lease_s=settings.upstream_timeout_s + LEASE_MARGIN_S,
        announced_outage_s=settings.upstream_announced_outage_s,
    )
    pipeline = Pipeline(
        ledger=DeliveryStore(
            engine,
            cipher,
            owner=owner,
            lease_s=settings.delivery_lease_s,
            actor=actor,
            sequencing=settings.sequence_dead_letters,
        ),
        upstream=upstream,
        token_errors=(TokenUnavailable,),
        policy=delivery_policy(settings),
        signing_keys=dict(settings.signing_keys()),
        lane_cipher=cipher,
        slots=LaneSlots(settings.worker_concurrency, settings.priority_share),
        lanes=settings.lanes,
        lease_s=settings.delivery_lease_s,
        upstream_timeout_s=settings.upstream_timeout_s,
        actor=actor,
        breaker=breaker,
    )

    async def close() -> None:
        await kafka.stop()
        await http.aclose()
        await engine.dispose()

    return WorkerParts(
        pipeline=pipeline,
        breaker=breaker,
        housekeeping=_housekeeping(
            settings,
            engine,
            cipher,
            kafka,
            republisher,
            actor,
            LaneLog(settings, settings.kafka_group_id, list(settings.lanes.values())),
            metrics.PUBLISHED_AGAIN.inc,
            pipeline.waiting_on_absent,
        ),
        token_valid=lambda: upstream.tokens.valid,
        close=close,
    )


async def run_worker(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    as_process = stop is None
    if stop is None:  # run as a process: stop on SIGINT/SIGTERM
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    parts = await worker_parts(settings)
    if as_process:  # inside a host process (tests), the collector is the host's to tune
        # What start-up built stays for the process's life: every full collection of a
        # delivering worker walked it again. Measured (bench worker row, 0 ms upstream), CPU
        # per delivery 616 / 576 / 834 us before, 527 / 435 / 524 with the intake's
        # `settle_heap` — but its rarer young collections let cyclic garbage pile up (peak
        # RSS draining 100,000 records 186 -> 397 MiB), so the worker keeps the default
        # thresholds: 523 us, 184 MiB.
        freeze_heap()
    await serve(settings, parts, stop, transient=kafka_unavailable)


# -- the operator's commands ----------------------------------------------------------------


async def operator_services(settings: OperatorSettings) -> Operations:
    engine = make_engine(
        settings.database_url, 4, idle_in_transaction_s=settings.database_idle_in_transaction_s
    )
    await ensure_schema_current(engine)
    kafka = KafkaPublisher(settings)
    cipher = PayloadCipher(settings.encryption_keyring())
    republisher = Republisher(engine, kafka, cipher, lane_sealer(settings, cipher))
    return Operations(
        engine, cipher, republisher, approval_threshold=settings.replay_approval_threshold
    )


async def close_operator(ops: Operations) -> None:
    await ops.republisher.publisher.stop()
    await ops.engine.dispose()
