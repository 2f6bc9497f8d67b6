"""Publishing a desk's accepted records to their lanes, signed; a request counts as published
only when the broker acknowledged every one of its records (acks=all)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.trace import SpanKind

from ledger.crypto import LaneSealer
from runtime import tracing
from runtime.cpu import HEAVY_RECORDS, off_loop
from runtime.kafka import BuiltBatch, OutgoingRecord, build_batches
from schemas.envelope import SCHEMA_VERSION, Envelope, kafka_headers

# How long a big request waits for its topics' partitions before building its records here.
PARTITIONS_WAIT_S = 2.0


class Sink(Protocol):
    """Where records go (runtime.kafka.KafkaPublisher; a fake in tests)."""

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None: ...

    async def send_built(self, batches: Sequence[BuiltBatch], *, what: str = "") -> None: ...

    async def partitions(self, topics: Iterable[str]) -> dict[str, list[int]]: ...


@dataclass(frozen=True, slots=True)
class Publication:
    """Everything a request's records need to go on their lanes, signed: built here for a
    small request (`record`), or handed to the worker process that prepares a big one, which
    lays its records into record batches (`lay_out`, given the topics' `partitions`)."""

    sealer: LaneSealer = field(repr=False)  # holds the signing (and sealing) keys
    lanes: dict[str, str]  # lane -> topic
    desk: str
    trader: str
    trace_id: str
    batch_id: str
    extra: tuple[tuple[str, bytes | None], ...] = ()  # e.g. the publish span's traceparent
    partitions: dict[str, list[int]] = field(default_factory=dict)  # topic -> its partitions

    def record(self, envelope: Envelope) -> OutgoingRecord:
        """One accepted record as it goes on its lane: keyed by its contract, sealed and
        signed."""
        headers = {
            "message_id": envelope.message_id,
            "desk": self.desk,
            "trader": self.trader,
            "trace_id": self.trace_id,
            "schema_version": SCHEMA_VERSION,
            "batch_id": self.batch_id,
        }
        wire = self.sealer.seal(envelope.value, headers)
        return (
            self.lanes[envelope.lane],
            envelope.contract_id.encode(),
            wire,
            [*kafka_headers(headers), *self.extra],
        )

    def lay_out(self, envelopes: Sequence[Envelope]) -> list[BuiltBatch]:
        return build_batches([self.record(e) for e in envelopes], self.partitions)


class SettlementPublisher:
    def __init__(self, kafka: Sink, lanes: dict[str, str], sealer: LaneSealer) -> None:
        self.kafka = kafka
        self.lanes = dict(lanes)  # lane -> topic
        self._sealer = sealer

    def topic_for(self, envelope: Envelope) -> str:
        return self.lanes[envelope.lane]

    def publication_for(
        self,
        *,
        desk: str,
        trader: str,
        trace_id: str,
        batch_id: str,
        extra: Sequence[tuple[str, bytes | None]] = (),
        partitions: dict[str, list[int]] | None = None,
    ) -> Publication:
        return Publication(
            self._sealer,
            self.lanes,
            desk,
            trader,
            trace_id,
            batch_id,
            tuple(extra),
            partitions or {},
        )

    async def publication(
        self, *, desk: str, trader: str, trace_id: str, batch_id: str
    ) -> Publication | None:
        """What a worker process needs to lay a big request's records into record batches;
        None when they must be built here: while tracing, each record carries its publish
        span (known only here), and without the topics' partitions (the broker away: the
        publish then fails as it would have)."""
        if tracing.active():
            return None
        try:
            async with asyncio.timeout(PARTITIONS_WAIT_S):
                partitions = await self.kafka.partitions(set(self.lanes.values()))
        except Exception:
            return None
        return self.publication_for(
            desk=desk, trader=trader, trace_id=trace_id, batch_id=batch_id, partitions=partitions
        )

    async def publish_built(self, batches: Sequence[BuiltBatch], *, batch_id: str) -> None:
        """A request's records laid into record batches by `Publication.lay_out`. Raises
        runtime.kafka.PublishFailed unless the broker acknowledged all of them."""
        with tracing.span(
            "kafka publish",
            SpanKind.PRODUCER,
            records=sum(b[3] for b in batches),
            batch_id=batch_id,
        ):
            await self.kafka.send_built(batches, what=f"batch {batch_id}")

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
            publication = self.publication_for(
                desk=desk, trader=trader, trace_id=trace_id, batch_id=batch_id, extra=extra
            )

            def records() -> list[OutgoingRecord]:
                return [publication.record(e) for e in envelopes]

            # Signing (and sealing) every record is CPU: a big batch's runs off the event loop.
            outgoing = await off_loop(len(envelopes) > HEAVY_RECORDS, records)
            await self.kafka.send_all(outgoing, what=f"batch {batch_id}")
