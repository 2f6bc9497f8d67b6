"""Kafka plumbing shared by intake, workers and tools: explicit topic creation and producers.

Topics are created explicitly (never auto-created, which would give them the broker's default
partition count). The idempotent producer is a setting: on for Apache Kafka, off for Tansu.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runtime.settings import Settings


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


def all_topics(settings: Settings) -> list[str]:
    return [settings.topic_priority, settings.topic_standard, settings.topic_reconciliation]


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
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
