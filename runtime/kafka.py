"""Kafka plumbing shared by intake, workers and operators: explicit topic creation, producers,
and publishing that counts only what the broker acknowledged.

Topics are created explicitly (never auto-created, which would give them the broker's default
partition count). The idempotent producer is a setting: on for Apache Kafka, off for Tansu.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runtime.settings import KafkaSettings

log = structlog.get_logger("etrm.kafka")

# (topic, key, value, headers)
OutgoingRecord = tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes | None]]]


class PublishFailed(Exception):
    """The broker did not acknowledge every record in time."""


async def ensure_topics(
    bootstrap: str, names: Iterable[str], partitions: int, timeout_s: float = 30.0
) -> None:
    """Create the topics that do not exist yet. Bounded: a broker that takes the connection
    and never answers is a TimeoutError (the callers retry), never a start that hangs."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            existing = set(await admin.list_topics())
            wanted = [NewTopic(n, partitions, 1) for n in names if n not in existing]
            if wanted:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(wanted)
    finally:
        await admin.close()


def make_producer(settings: KafkaSettings, **overrides: object) -> AIOKafkaProducer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "linger_ms": 2,
        "max_batch_size": 1024 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "request_timeout_ms": max(1000, int(settings.kafka_publish_timeout_s * 1000)),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


class KafkaPublisher:
    """One producer per process, started on first use (the broker may come later)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self.timeout_s = settings.kafka_publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = make_producer(self._settings)
                try:
                    await producer.start()
                except Exception:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # the broker may come later; /readyz tells
            await asyncio.wait_for(self._ready(), self.timeout_s)

    async def stop(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    async def ping(self) -> None:
        producer = await asyncio.wait_for(self._ready(), 2.0)
        await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None:
        """Send every record and wait until the broker acknowledged all of them (acks=all);
        PublishFailed when that does not happen within the publish timeout."""
        if not records:
            return

        async def send() -> None:
            producer = await self._ready()
            # The producer batches records per partition; one awaited ack per batch.
            pending = [
                await producer.send(topic, value=value, key=key, headers=list(headers))
                for topic, key, value, headers in records
            ]
            await asyncio.gather(*pending)

        try:
            await asyncio.wait_for(send(), self.timeout_s)
        except Exception as exc:
            log.warning("publish_failed", error=type(exc).__name__, records=len(records), what=what)
            raise PublishFailed(type(exc).__name__) from None
