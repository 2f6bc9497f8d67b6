"""Forwarding consumed records to the upstream, pipelined across polls.

Rules kept here:
- a message whose signature or shape is bad is dead-lettered, never delivered;
- the ledger is asked once per poll which messages are new, in flight or already final;
- messages of one contract go upstream one after another in offset order, across polls;
  different contracts go concurrently, at most `concurrency` at a time, so one contract
  waiting out its retry budget never holds back the others;
- a lower revision than one the upstream already took ends `superseded` without being sent;
- a dead letter is on the reconciliation topic (acknowledged) before the ledger says so;
- an offset becomes committable only when its record's final state is written to the ledger,
  and only together with every offset before it (workers.offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import OrderedDict, deque
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
from workers.offsets import OffsetTracker
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
    """Group commit for outcomes: whatever is pending is written in one statement, then the
    next group; each outcome's future resolves once its row is committed. A failed write is
    retried until it succeeds (offsets wait for it, nothing is lost)."""

    RETRY_DELAY_S = 1.0

    def __init__(self, engine: AsyncEngine, actor: Actor, cipher: PayloadCipher) -> None:
        self._engine = engine
        self._actor = actor
        self._cipher = cipher
        self._pending: list[tuple[Outcome, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, outcome: Outcome) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future))
        self._wake.set()
        return future

    async def flush(self) -> None:
        if not self._pending:
            return
        group, self._pending = self._pending, []
        try:
            await store.write_outcomes(
                self._engine, [o for o, _ in group], self._actor, self._cipher
            )
        except Exception:
            self._pending[:0] = group
            raise
        for _, future in group:
            if not future.done():
                future.set_result(None)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.warning("outcome_write_failed_will_retry", error=type(exc).__name__)
                await asyncio.sleep(self.RETRY_DELAY_S)
                self._wake.set()

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
        max_in_flight: int = 2000,
    ) -> None:
        self._cipher = cipher
        self._engine = engine
        self._upstream = upstream
        self._publish_dead_letter = publish_dead_letter
        self._keys = signing_keys
        self._slots = asyncio.Semaphore(concurrency)
        self._threshold = drift_threshold
        self._max_in_flight = max_in_flight
        self.actor = Actor("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.writer = OutcomeWriter(engine, self.actor, cipher)
        self.offsets = OffsetTracker()
        self._room = asyncio.Event()
        self._room.set()
        self._chains: dict[str, deque[tuple[_Parsed, Claim]]] = {}
        self._in_flight_ids: set[str] = set()
        self._followers: dict[str, list[ConsumedRecord]] = {}
        # Highest revision the upstream took per identity, as this worker saw it; the ledger's
        # answer at claim time can be older than a delivery still being written.
        self._highest: OrderedDict[str, int] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- entry point ---------------------------------------------------------------------------

    async def process(self, records: Sequence[ConsumedRecord]) -> None:
        """Take one poll into the pipeline; returns once it is claimed and dispatched (and
        waits first while too many records are in flight, so memory stays bounded)."""
        while self.offsets.in_flight >= self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        parsed: list[_Parsed] = []
        untrusted: list[tuple[ConsumedRecord, dict[str, Any]]] = []
        duplicates: list[tuple[str, ConsumedRecord]] = []
        seen: set[str] = set()
        for record in records:
            item = await self._parse(record, untrusted)
            if item is None:
                continue
            message_id = item.incoming.message_id
            # The same message twice (a resubmission, a replay, a re-read after a rebalance)
            # is forwarded once; the later copy's offset finishes when the first copy's final
            # state is written, never before.
            if message_id in seen or message_id in self._in_flight_ids:
                duplicates.append((message_id, record))
            else:
                seen.add(message_id)
                parsed.append(item)
        if untrusted:
            await store.record_untrusted_dead_letters(
                self._engine, [row for _, row in untrusted], self._cipher
            )
        claims = (
            await store.claim_batch(
                self._engine, [p.incoming for p in parsed], self.actor, self._cipher
            )
            if parsed
            else {}
        )
        for record in records:
            self.offsets.track((record.topic, record.partition), record.offset)
        for record, _ in untrusted:
            self._finished(record)
        for message_id, record in duplicates:
            self._followers.setdefault(message_id, []).append(record)
        for item in parsed:
            claim = claims[item.incoming.message_id]
            if claim.status == "final":
                self._release(item)
                continue
            self._in_flight_ids.add(item.incoming.message_id)
            contract = item.incoming.contract_id
            chain = self._chains.get(contract)
            if chain is None:
                chain = self._chains[contract] = deque()
                task = asyncio.create_task(self._run_chain(contract, chain))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            chain.append((item, claim))

    def _finished(self, record: ConsumedRecord) -> None:
        self.offsets.finish((record.topic, record.partition), record.offset)
        if self.offsets.in_flight < self._max_in_flight:
            self._room.set()

    def _release(self, item: _Parsed) -> None:
        """The record and any later copies of the same message are finished."""
        message_id = item.incoming.message_id
        self._in_flight_ids.discard(message_id)
        self._finished(item.record)
        for follower in self._followers.pop(message_id, []):
            self._finished(follower)

    def _after_write(self, item: _Parsed, written: asyncio.Future[None]) -> None:
        written.add_done_callback(lambda _: self._release(item))

    async def drain(self, timeout: float) -> None:
        """On shutdown: let running chains finish (bounded), then write what they produced."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        with contextlib.suppress(Exception):
            await self.writer.flush()

    async def stop_chains(self) -> None:
        """Chains still waiting (e.g. out a retry budget) stop; their records are not committed
        and are read again by whoever owns the partition next."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- parsing and trust ---------------------------------------------------------------------

    async def _parse(
        self, record: ConsumedRecord, untrusted: list[tuple[ConsumedRecord, dict[str, Any]]]
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
            (
                record,
                self._dead_letter_row(record, headers, reason, None, problem, 0, now, now, None),
            )
        )
        return None

    # -- one contract's chain ------------------------------------------------------------------

    async def _run_chain(self, contract: str, chain: deque[tuple[_Parsed, Claim]]) -> None:
        """One contract's records, one after another, for as long as more keep arriving."""
        try:
            async with self._slots:
                while chain:
                    item, claim = chain[0]
                    written = await self._forward(item, claim)
                    self._after_write(item, written)
                    chain.popleft()
        finally:
            if self._chains.get(contract) is chain:
                del self._chains[contract]
            if chain:  # cancelled on shutdown: re-read after restart, nothing is committed
                log.info("chain_stopped", contract_id=contract, pending=len(chain))

    async def _forward(self, item: _Parsed, claim: Claim) -> asyncio.Future[None]:
        msg = item.incoming
        if claim.status == "conflict":
            return await self._fail(
                item,
                "invalid_message",
                None,
                "revision_conflict: same identity and revision with other content",
                claim.attempts,
                None,
            )
        best = max(claim.max_accepted_revision or 0, self._highest.get(msg.identity, 0)) or None
        if is_superseded(msg.revision, best):
            return self._finish(
                msg,
                "superseded",
                claim.attempts,
                f"revision {msg.revision} < delivered revision {best}",
            )
        result = await self._upstream.deliver(
            msg.value,
            msg.message_id,
            msg.trace_id,
            prior_attempts=claim.attempts,
            on_retry=self._progress(msg.message_id),
        )
        if result.outcome == "delivered":
            self._remember(msg.identity, msg.revision)
            return self._delivered(msg, result)
        return await self._fail(
            item, result.outcome, result.status, result.error or "", result.attempts, result
        )

    def _remember(self, identity: str, revision: int) -> None:
        self._highest[identity] = max(revision, self._highest.get(identity, 0))
        self._highest.move_to_end(identity)
        if len(self._highest) > 100_000:
            self._highest.popitem(last=False)

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

    def _finish(
        self, msg: Incoming, state: str, attempts: int, detail: str
    ) -> asyncio.Future[None]:
        self._outcome(msg, state, attempts)
        return self.writer.add(Outcome(msg.message_id, state, attempts, detail=detail))

    def _delivered(self, msg: Incoming, result: DeliveryResult) -> asyncio.Future[None]:
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
            metrics.HOLDS_OPENED.inc()
        self._outcome(
            msg, outcome.state, result.attempts, upstream_transaction_id=result.transaction_id
        )
        return self.writer.add(outcome)

    async def _fail(
        self,
        item: _Parsed,
        reason: str,
        status: int | None,
        error: str,
        attempts: int,
        result: DeliveryResult | None,
    ) -> asyncio.Future[None]:
        now = datetime.now(UTC)
        first = result.first_attempt_at if result else now
        last = result.last_attempt_at if result else now
        await self._dead_letter(item.record, reason, status, error, attempts, first, last)
        headers = header_map(item.record.headers)
        self._outcome(item.incoming, "dead_lettered", attempts, reason=reason, status=status)
        return self.writer.add(
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
