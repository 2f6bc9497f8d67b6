"""Publishing accepted records to their lanes; a request is accepted only when the broker has
acknowledged every one of its records (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer

from runtime.kafka import make_producer
from runtime.settings import Settings
from schemas.envelope import SCHEMA_VERSION, Envelope, kafka_headers, sign_message

log = structlog.get_logger("etrm.intake")


OutgoingRecord = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]


class PublishFailed(Exception):
    """The broker did not acknowledge every record in time; nothing may be reported accepted."""


class SettlementPublisher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lanes = {"priority": settings.topic_priority, "standard": settings.topic_standard}
        self._kid, self._secret = settings.signing_keys()[0]
        self._timeout = settings.kafka_publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _ready_producer(self) -> AIOKafkaProducer:
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
            await asyncio.wait_for(self._ready_producer(), self._timeout)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def ping(self) -> None:
        producer = await asyncio.wait_for(self._ready_producer(), 2.0)
        await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)

    def topic_for(self, envelope: Envelope) -> str:
        return self._lanes[envelope.lane]

    def headers_for(
        self, envelope: Envelope, *, desk: str, trader: str, trace_id: str, batch_id: str
    ) -> list[tuple[str, bytes]]:
        headers = {
            "message_id": envelope.message_id,
            "desk": desk,
            "trader": trader,
            "trace_id": trace_id,
            "schema_version": SCHEMA_VERSION,
            "batch_id": batch_id,
        }
        headers["signature"] = sign_message(envelope.value, headers, self._kid, self._secret)
        return kafka_headers(headers)

    def signed(self, value: bytes, headers: dict[str, str]) -> list[tuple[str, bytes]]:
        """Headers with a fresh signature from the active key (replays, re-published records)."""
        headers = {k: v for k, v in headers.items() if k != "signature"}
        headers["signature"] = sign_message(value, headers, self._kid, self._secret)
        return kafka_headers(headers)

    async def publish(
        self,
        envelopes: Sequence[Envelope],
        *,
        desk: str,
        trader: str,
        trace_id: str,
        batch_id: str,
    ) -> None:
        await self.send_all(
            [
                (
                    self.topic_for(envelope),
                    envelope.contract_id.encode(),
                    envelope.value,
                    self.headers_for(
                        envelope, desk=desk, trader=trader, trace_id=trace_id, batch_id=batch_id
                    ),
                )
                for envelope in envelopes
            ],
            trace_id=trace_id,
        )

    async def send_all(self, records: Sequence[OutgoingRecord], *, trace_id: str = "") -> None:
        """Send every record and wait for the broker to acknowledge all of them (acks=all)."""

        async def send() -> None:
            producer = await self._ready_producer()
            pending = [
                await producer.send(topic, value=value, key=key, headers=headers)
                for topic, key, value, headers in records
            ]
            await asyncio.gather(*pending)

        try:
            await asyncio.wait_for(send(), self._timeout)
        except Exception as exc:
            log.warning(
                "publish_failed", error=type(exc).__name__, records=len(records), trace_id=trace_id
            )
            raise PublishFailed(type(exc).__name__) from None
