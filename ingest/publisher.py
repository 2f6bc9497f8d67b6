"""Publishing a desk's accepted records to their lanes, signed; a request counts as published
only when the broker acknowledged every one of its records (acks=all)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from opentelemetry.trace import SpanKind

from ledger.crypto import LaneSealer
from runtime import tracing
from runtime.cpu import HEAVY_RECORDS, off_loop
from runtime.kafka import OutgoingRecord
from schemas.envelope import SCHEMA_VERSION, Envelope, kafka_headers


class Sink(Protocol):
    """Where records go (runtime.kafka.KafkaPublisher; a fake in tests)."""

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None: ...


class SettlementPublisher:
    def __init__(self, kafka: Sink, lanes: dict[str, str], sealer: LaneSealer) -> None:
        self.kafka = kafka
        self.lanes = dict(lanes)  # lane -> topic
        self._sealer = sealer

    def topic_for(self, envelope: Envelope) -> str:
        return self.lanes[envelope.lane]

    def record_for(
        self,
        envelope: Envelope,
        *,
        desk: str,
        trader: str,
        trace_id: str,
        batch_id: str,
        extra: Sequence[tuple[str, bytes | None]] = (),
    ) -> OutgoingRecord:
        headers = {
            "message_id": envelope.message_id,
            "desk": desk,
            "trader": trader,
            "trace_id": trace_id,
            "schema_version": SCHEMA_VERSION,
            "batch_id": batch_id,
        }
        wire = self._sealer.seal(envelope.value, headers)
        return (
            self.topic_for(envelope),
            envelope.contract_id.encode(),
            wire,
            [*kafka_headers(headers), *extra],
        )

    async def publish(
        self,
        envelopes: Sequence[Envelope],
        *,
        desk: str,
        trader: str,
        trace_id: str,
        batch_id: str,
    ) -> None:
        """Raises runtime.kafka.PublishFailed unless the broker acknowledged all of them."""
        with tracing.span(
            "kafka publish", SpanKind.PRODUCER, records=len(envelopes), batch_id=batch_id
        ):
            parent = tracing.traceparent()
            # the worker continues this trace (W3C trace context)
            extra = [("traceparent", parent.encode())] if parent is not None else []

            def records() -> list[OutgoingRecord]:
                return [
                    self.record_for(
                        e,
                        desk=desk,
                        trader=trader,
                        trace_id=trace_id,
                        batch_id=batch_id,
                        extra=extra,
                    )
                    for e in envelopes
                ]

            # Signing (and sealing) every record is CPU: a big batch's runs off the event loop.
            outgoing = await off_loop(len(envelopes) > HEAVY_RECORDS, records)
            await self.kafka.send_all(outgoing, what=f"batch {batch_id}")
