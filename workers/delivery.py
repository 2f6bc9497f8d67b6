"""Forwarding one polled batch: every message reaches a final state before the batch is done.

Rules kept here:
- a message whose signature or shape is bad is dead-lettered, never delivered;
- the ledger is asked once per batch which messages are new, in flight or already final;
- messages of one contract go upstream one after another in offset order; different contracts
  go concurrently, at most `concurrency` at a time;
- a lower revision than one the upstream already took ends `superseded` without being sent;
- a dead letter is on the reconciliation topic (acknowledged) before the ledger says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import orjson
import structlog
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import store
from ledger.audit import Actor
from ledger.crypto import PayloadCipher
from ledger.store import Claim, Incoming, Outcome
from schemas.envelope import (
    DeadLetterError,
    cap_text,
    header_map,
    identity_hash,
    message_id_for,
    verify_message,
)
from schemas.records import CanonicalRecord
from workers import metrics
from workers.rules import drift, is_superseded
from workers.upstream import DeliveryResult, UpstreamClient

log = structlog.get_logger("etrm.worker")


class ConsumedRecord(Protocol):
    """The parts of an aiokafka ConsumerRecord a worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


DeadLetterPublisher = Callable[[bytes | None, bytes, list[tuple[str, bytes]]], Awaitable[None]]


@dataclass(slots=True)
class _Parsed:
    record: ConsumedRecord
    incoming: Incoming


class OutcomeWriter:
    """Buffers outcomes and writes them in one statement per flush (at batch end, and every
    `interval` seconds while a batch is long-running, so the API shows progress)."""

    def __init__(
        self, engine: AsyncEngine, actor: Actor, cipher: PayloadCipher, interval: float = 0.25
    ) -> None:
        self._engine = engine
        self._actor = actor
        self._cipher = cipher
        self._pending: list[Outcome] = []
        self._interval = interval
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def add(self, outcome: Outcome) -> None:
        self._pending.append(outcome)

    async def flush(self) -> None:
        async with self._lock:
            pending, self._pending = self._pending, []
            try:
                await store.write_outcomes(self._engine, pending, self._actor, self._cipher)
            except Exception:
                self._pending[:0] = pending
                raise

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._pending:
                with contextlib.suppress(Exception):  # the batch-end flush reports errors
                    await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Forwarder:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        upstream: UpstreamClient,
        publish_dead_letter: DeadLetterPublisher,
        signing_keys: dict[str, bytes],
        concurrency: int,
        drift_threshold: Decimal,
        cipher: PayloadCipher,
    ) -> None:
        self._cipher = cipher
        self._engine = engine
        self._upstream = upstream
        self._publish_dead_letter = publish_dead_letter
        self._keys = signing_keys
        self._slots = asyncio.Semaphore(concurrency)
        self._threshold = drift_threshold
        self.actor = Actor("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.writer = OutcomeWriter(engine, self.actor, cipher)

    # -- entry point ---------------------------------------------------------------------------

    async def process(self, records: Sequence[ConsumedRecord]) -> None:
        parsed: list[_Parsed] = []
        untrusted: list[dict[str, Any]] = []
        seen: set[str] = set()
        for record in records:
            item = await self._parse(record, untrusted)
            # The same message twice in one poll (a resubmission, a replay) is forwarded once.
            if item is not None and item.incoming.message_id not in seen:
                seen.add(item.incoming.message_id)
                parsed.append(item)
        if untrusted:
            await store.record_untrusted_dead_letters(self._engine, untrusted, self._cipher)
        if not parsed:
            return
        claims = await store.claim_batch(
            self._engine, [p.incoming for p in parsed], self.actor, self._cipher
        )
        chains: dict[str, list[_Parsed]] = defaultdict(list)
        for item in parsed:
            chains[item.incoming.contract_id].append(item)
        try:
            async with asyncio.TaskGroup() as group:
                for chain in chains.values():
                    group.create_task(self._run_chain(chain, claims))
        finally:
            await self.writer.flush()

    # -- parsing and trust ---------------------------------------------------------------------

    async def _parse(
        self, record: ConsumedRecord, untrusted: list[dict[str, Any]]
    ) -> _Parsed | None:
        headers = header_map(record.headers)
        value = record.value or b""
        problem = verify_message(value, headers, self._keys)
        reason = "invalid_signature"
        incoming: Incoming | None = None
        if problem is None:
            reason = "invalid_message"
            try:
                canonical = CanonicalRecord.model_validate(orjson.loads(value))
                wire = canonical.to_wire()
                desk = headers["desk"]
                if message_id_for(desk, value) != headers["message_id"]:
                    problem = "message_id does not match the record"
                else:
                    incoming = Incoming(
                        message_id=headers["message_id"],
                        desk=desk,
                        trader=headers["trader"],
                        batch_id=headers.get("batch_id"),
                        settlement_run_id=canonical.settlement_run_id,
                        contract_id=canonical.contract_id,
                        market=wire["market"],
                        identity=identity_hash(desk, wire),
                        revision=canonical.revision,
                        topic=record.topic,
                        position_mwh=Decimal(wire["position_mwh"]),
                        value=value,
                        trace_id=headers["trace_id"],
                        partition=record.partition,
                        offset=record.offset,
                    )
            except (orjson.JSONDecodeError, ValidationError, KeyError) as exc:
                problem = f"not a canonical settlement record: {type(exc).__name__}"
        if incoming is not None:
            return _Parsed(record, incoming)
        assert problem is not None
        now = datetime.now(UTC)
        await self._dead_letter(record, reason, None, problem, 0, now, now)
        log.warning(
            "message_rejected",
            reason=reason,
            problem=problem,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        untrusted.append(
            self._dead_letter_row(record, headers, reason, None, problem, 0, now, now, None)
        )
        return None

    # -- one contract's chain ------------------------------------------------------------------

    async def _run_chain(self, chain: list[_Parsed], claims: dict[str, Claim]) -> None:
        async with self._slots:
            highest: dict[str, int | None] = {}
            for item in chain:
                msg = item.incoming
                claim = claims[msg.message_id]
                if claim.status == "final":
                    continue
                best = highest.get(msg.identity, claim.max_accepted_revision)
                if claim.status == "conflict":
                    await self._fail(
                        item,
                        "invalid_message",
                        None,
                        "revision_conflict: same identity and revision with other content",
                        claim.attempts,
                        None,
                    )
                    continue
                if is_superseded(msg.revision, best):
                    self._finish(
                        msg,
                        "superseded",
                        claim.attempts,
                        f"revision {msg.revision} < delivered revision {best}",
                    )
                    continue
                result = await self._upstream.deliver(
                    msg.value,
                    msg.message_id,
                    msg.trace_id,
                    prior_attempts=claim.attempts,
                    on_retry=self._progress(msg.message_id),
                )
                if result.outcome == "delivered":
                    self._delivered(msg, result)
                    highest[msg.identity] = max(best or 0, msg.revision)
                else:
                    await self._fail(
                        item,
                        result.outcome,
                        result.status,
                        result.error or "",
                        result.attempts,
                        result,
                    )

    def _progress(self, message_id: str) -> Callable[[int, str], Awaitable[None]]:
        async def hook(attempts: int, error: str) -> None:
            self.writer.add(
                Outcome(
                    message_id,
                    "delivering",
                    attempts,
                    last_error=error,
                    last_attempt_at=datetime.now(UTC),
                    record_event=False,
                )
            )

        return hook

    @staticmethod
    def _outcome(msg: Incoming, state: str, attempts: int, **extra: Any) -> None:
        """One log line per final state: the trace id follows the record from the intake."""
        metrics.DELIVERIES.labels(state).inc()
        log.info(
            "delivery_outcome",
            state=state,
            message_id=msg.message_id,
            trace_id=msg.trace_id,
            desk=msg.desk,
            contract_id=msg.contract_id,
            revision=msg.revision,
            attempts=attempts,
            **extra,
        )

    def _finish(self, msg: Incoming, state: str, attempts: int, detail: str) -> None:
        self._outcome(msg, state, attempts)
        self.writer.add(Outcome(msg.message_id, state, attempts, detail=detail))

    def _delivered(self, msg: Incoming, result: DeliveryResult) -> None:
        variance = None
        if result.reconciled_position_mwh is not None:
            variance = drift(msg.position_mwh, result.reconciled_position_mwh, self._threshold)
        outcome = Outcome(
            msg.message_id,
            "delivered" if variance is None else "held",
            result.attempts,
            detail=f"transaction {result.transaction_id}",
            upstream_transaction_id=result.transaction_id,
            reconciled_position_mwh=result.reconciled_position_mwh,
            first_attempt_at=result.first_attempt_at,
            last_attempt_at=result.last_attempt_at,
        )
        if variance is not None:
            outcome.detail = (
                f"reconciled {result.reconciled_position_mwh} vs submitted "
                f"{msg.position_mwh} (variance {variance})"
            )
            outcome.hold = {
                "hold_id": store.new_id("hold"),
                "message_id": msg.message_id,
                "desk": msg.desk,
                "contract_id": msg.contract_id,
                "submitted": msg.position_mwh,
                "reconciled": result.reconciled_position_mwh,
                "variance": variance,
            }
            metrics.HOLDS_OPEN.inc()
        self._outcome(
            msg, outcome.state, result.attempts, upstream_transaction_id=result.transaction_id
        )
        self.writer.add(outcome)

    async def _fail(
        self,
        item: _Parsed,
        reason: str,
        status: int | None,
        error: str,
        attempts: int,
        result: DeliveryResult | None,
    ) -> None:
        now = datetime.now(UTC)
        first = result.first_attempt_at if result else now
        last = result.last_attempt_at if result else now
        await self._dead_letter(item.record, reason, status, error, attempts, first, last)
        headers = header_map(item.record.headers)
        self._outcome(item.incoming, "dead_lettered", attempts, reason=reason, status=status)
        self.writer.add(
            Outcome(
                item.incoming.message_id,
                "dead_lettered",
                attempts,
                detail=f"{reason}: {cap_text(error, 500)}",
                last_error=cap_text(error),
                first_attempt_at=first if result else None,
                last_attempt_at=last if result else None,
                dead_letter=self._dead_letter_row(
                    item.record,
                    headers,
                    reason,
                    status,
                    error,
                    attempts,
                    first,
                    last,
                    item.incoming,
                ),
            )
        )

    # -- dead letters --------------------------------------------------------------------------

    async def _dead_letter(
        self,
        record: ConsumedRecord,
        reason: str,
        status: int | None,
        error_text: str,
        attempts: int,
        first: datetime,
        last: datetime,
    ) -> None:
        error = DeadLetterError(
            reason,
            status,
            error_text,
            attempts,
            first,
            last,
            record.topic,
            record.partition,
            record.offset,
        )
        headers = [*record.headers, *error.headers()]
        await self._publish_dead_letter(record.key, record.value or b"", headers)
        metrics.DEAD_LETTERS.labels(reason).inc()

    @staticmethod
    def _dead_letter_row(
        record: ConsumedRecord,
        headers: dict[str, str],
        reason: str,
        status: int | None,
        error: str,
        attempts: int,
        first: datetime,
        last: datetime,
        incoming: Incoming | None,
    ) -> dict[str, Any]:
        return {
            "dead_letter_id": store.new_id("dl"),
            "message_id": incoming.message_id if incoming else headers.get("message_id"),
            "desk": incoming.desk if incoming else headers.get("desk"),
            "settlement_run_id": incoming.settlement_run_id if incoming else None,
            "contract_id": incoming.contract_id if incoming else None,
            "reason": reason,
            "error_status": status,
            "attempts": attempts,
            "last_error": cap_text(error),
            "first_attempt_at": first,
            "last_attempt_at": last,
            "source_topic": record.topic,
            "source_partition": record.partition,
            "source_offset": record.offset,
            "kafka_key": record.key,
            "kafka_value": record.value or b"",
            "kafka_headers": headers,
        }
