"""In-memory stand-ins for the ledger, the broker and the upstream, with the semantics the real
ones have (the same scenarios run against these and against real Postgres in
tests/integration/test_ledger_scenarios.py), so routes and the worker's pipeline can be
tested without servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatch
from sqlalchemy.exc import OperationalError

from ingest.deps import IntakeLedger
from ingest.publisher import SettlementPublisher
from ledger.acceptance import (
    Begun,
    Busy,
    KeyHeld,
    Pending,
    RecordToAccept,
    Request,
    RevisionConflict,
)
from ledger.reads import Batch, BatchRecord, HistoryRow, Message, OpenWork
from ledger.rows import (
    Actor,
    Circuit,
    ClaimRequest,
    ClaimRow,
    DeadLetterRow,
    LateTaken,
    MaintenanceWindow,
    Outcome,
    Predecessors,
    UpstreamView,
)
from runtime.kafka import BuiltBatch, OutgoingRecord, PublishFailed
from schemas.envelope import Envelope, envelope_for, validate_record
from schemas.records import CanonicalRecord
from schemas.states import (
    FINAL_STATES,
    TAKEN_UPSTREAM,
    UNCERTAIN_REASONS,
    BatchState,
    CircuitState,
    MessageState,
    Sequencing,
)
from workers.rules import Answer, is_superseded

S = MessageState


class DatabaseAway(OperationalError):
    def __init__(self) -> None:
        super().__init__("SELECT 1", {}, ConnectionRefusedError("database away"))


@dataclass
class Row:
    """One record in the fake ledger."""

    message_id: str
    desk: str
    contract_id: str
    identity: str
    revision: int
    state: MessageState
    publication: str
    publication_kind: str
    accept_seq: int
    batch_id: str
    trace_id: str = "t"
    settlement_run_id: str = "RUN"
    lease_epoch: int = 0
    lease_until: float = 0.0
    attempts: int = 0
    budget_used_s: float = 0.0
    upstream_transaction_id: str | None = None
    last_error: str | None = None
    dead_letter_id: str | None = None
    parked_behind: str | None = None
    history: list[tuple[str, str | None]] = field(default_factory=list)


class FakeLedger:
    """The intake's and the workers' ledger in memory (ledger.acceptance.IntakeStore and
    ledger.delivery.DeliveryStore)."""

    def __init__(self, lease_s: float = 10.0, sequencing: Sequencing = Sequencing.OFF) -> None:
        self.sequencing = sequencing
        self.claimed: list[str] = []  # every message id asked for, in order
        self.rows: dict[str, Row] = {}
        self.batches: dict[str, tuple[Request, BatchState]] = {}
        self.batch_records: dict[str, list[str]] = {}
        self.keys: dict[tuple[str, str], tuple[Request, str]] = {}  # -> (request, state)
        self.dead_letters: dict[str, DeadLetterRow] = {}
        self.dead_letter_status: dict[str, str] = {}
        self.holds: list[object] = []
        self.seq = 0
        self.lease_s = lease_s
        self.now = 0.0  # a clock the test moves
        self.away = False
        self.circuit = FakeCircuitStore()

    def _check(self) -> None:
        if self.away:
            raise DatabaseAway()

    # -- the intake ------------------------------------------------------------------------------

    def payload_cipher(self) -> None:
        return None  # keeps no payloads: nothing to lay out ahead

    async def begin(self, req: Request) -> Begun:
        self._check()
        held = self.keys.get((req.desk, req.idempotency_key))
        if held is not None:
            holder, state = held
            return KeyHeld(
                state,
                holder.request_hash,
                holder.resource_kind,
                holder.resource_id,
                holder.status_url,
            )
        for record in req.unique:
            for row in self.rows.values():
                if (
                    row.identity == record.identity
                    and row.revision == record.revision
                    and row.message_id != record.message_id
                    and row.state is not S.ABORTED
                ):
                    return RevisionConflict(record.index, row.message_id)
            existing = self.rows.get(record.message_id)
            if existing is not None and existing.state is S.PENDING:
                return Busy(0.01)
        to_publish = []
        for record in req.unique:
            existing = self.rows.get(record.message_id)
            if existing is None or existing.state is S.ABORTED:
                self.seq += 1
                self.rows[record.message_id] = Row(
                    record.message_id,
                    req.desk,
                    record.contract_id,
                    record.identity,
                    record.revision,
                    S.PENDING,
                    req.batch_id,
                    "intake",
                    self.seq,
                    req.batch_id,
                    req.trace_id,
                    req.settlement_run_id,
                )
                to_publish.append(record)
        self.keys[(req.desk, req.idempotency_key)] = (req, "in_flight")
        self.batches[req.batch_id] = (req, BatchState.PENDING)
        self.batch_records[req.batch_id] = [r.message_id for r in req.records]
        return Pending(to_publish)

    async def complete(self, req: Request, actor: Actor, new: int) -> bool:
        self._check()
        if self.batches[req.batch_id][1] is not BatchState.PENDING:
            return False
        self.batches[req.batch_id] = (req, BatchState.ACCEPTED)
        for row in self.rows.values():
            if row.publication == req.batch_id and row.state is S.PENDING:
                row.state = S.QUEUED
                row.history.append(("queued", "accepted"))
        self.keys[(req.desk, req.idempotency_key)] = (req, "completed")
        return True

    async def abort(self, req: Request) -> bool:
        self._check()
        if self.batches[req.batch_id][1] is BatchState.ACCEPTED:
            return False
        self.batches[req.batch_id] = (req, BatchState.ABORTED)
        for row in self.rows.values():
            if row.publication == req.batch_id and row.state is S.PENDING:
                row.state = S.ABORTED
        self.keys.pop((req.desk, req.idempotency_key), None)
        return True

    async def abort_stalled(self, batch_ids: Sequence[str]) -> None:
        self._check()
        for batch_id in batch_ids:
            found = self.batches.get(batch_id)
            if found is not None and found[1] is BatchState.PENDING:
                await self.abort(found[0])

    async def state_of(self, batch_id: str) -> BatchState | None:
        self._check()
        found = self.batches.get(batch_id)
        return found[1] if found else None

    async def get_batch(self, batch_id: str, desk: str | None) -> Batch | None:
        self._check()
        found = self.batches.get(batch_id)
        if found is None or found[1] is not BatchState.ACCEPTED:
            return None
        req = found[0]
        if desk is not None and req.desk != desk:
            return None
        records = [
            BatchRecord(i, mid, self.rows[mid].state, self.rows[mid].contract_id)
            for i, mid in enumerate(self.batch_records[batch_id])
        ]
        return Batch(batch_id, req.desk, req.settlement_run_id, datetime.now(UTC), records)

    async def get_message(self, message_id: str, desk: str | None) -> Message | None:
        self._check()
        row = self.rows.get(message_id)
        if row is None or row.state in (S.PENDING, S.ABORTED):
            return None
        if desk is not None and row.desk != desk:
            return None
        return Message(
            row.message_id,
            row.batch_id,
            row.desk,
            row.settlement_run_id,
            row.contract_id,
            row.revision,
            row.state,
            row.attempts,
            row.upstream_transaction_id,
            row.last_error,
            row.trace_id,
            row.dead_letter_id,
            None,
            [HistoryRow(s, datetime.now(UTC), d) for s, d in row.history],
        )

    async def open_work(self) -> OpenWork:
        self._check()
        open_dead_letters = sum(1 for s in self.dead_letter_status.values() if s == "open")
        return OpenWork(len(self.holds), open_dead_letters, 0.0)

    async def ping(self) -> None:
        self._check()

    async def upstream_view(self) -> UpstreamView:
        self._check()
        return await self.circuit.view()

    # -- the workers -----------------------------------------------------------------------------

    def _predecessors(self, row: Row) -> Predecessors:
        waiting = replaying = parked = dead_open = 0
        blocker: tuple[int, str] | None = None
        ahead: tuple[int, str] | None = None
        for other in self.rows.values():
            if (other.desk, other.contract_id) != (row.desk, row.contract_id):
                continue
            if other.accept_seq >= row.accept_seq:
                continue
            blocking = False
            if other.state in (S.PENDING, S.QUEUED, S.DELIVERING) and (
                ahead is None or other.accept_seq < ahead[0]
            ):
                ahead = (other.accept_seq, other.message_id)
            if other.state in (S.PENDING, S.QUEUED, S.DELIVERING):
                if other.publication_kind == "replay" and other.state is not S.PENDING:
                    replaying += 1
                    blocking = True
                else:
                    waiting += 1
            elif other.state is S.PARKED:
                parked += 1
                blocking = True
            elif other.state is S.DEAD_LETTERED and self.dead_letter_status.get(
                other.dead_letter_id or ""
            ) in ("open", "replaying"):
                dead_open += 1
                blocking = True
            if blocking and (blocker is None or other.accept_seq < blocker[0]):
                blocker = (other.accept_seq, other.message_id)
        return Predecessors(
            waiting,
            replaying,
            parked,
            dead_open,
            blocker[1] if blocker else None,
            ahead[1] if ahead else None,
        )

    async def claim(self, requests: Sequence[ClaimRequest]) -> list[ClaimRow]:
        self._check()
        self.claimed.extend(r.message_id for r in requests)
        found: list[ClaimRow] = []
        for request in requests:
            row = self.rows.get(request.message_id)
            if row is None:
                found.append(
                    ClaimRow(
                        request.message_id,
                        False,
                        None,
                        False,
                        None,
                        0,
                        0.0,
                        False,
                        False,
                        0,
                        None,
                        Predecessors(),
                    )
                )
                continue
            live = row.publication == request.publication
            before = replace(row)
            taken = [
                r.revision
                for r in self.rows.values()
                if r.identity == row.identity and r.state in TAKEN_UPSTREAM
            ]
            predecessors = self._predecessors(before)
            waits_only = not is_superseded(
                row.revision, max(taken) if taken else None
            ) and predecessors.hold_back(self.sequencing)
            epoch = None
            if (
                live
                and not waits_only
                and (
                    row.state is S.QUEUED
                    or (row.state is S.DELIVERING and row.lease_until < self.now)
                )
            ):
                row.state = S.DELIVERING
                row.lease_epoch += 1
                row.lease_until = self.now + self.lease_s
                row.attempts += 1
                epoch = row.lease_epoch
                row.history.append(("delivering", None))
            found.append(
                ClaimRow(
                    request.message_id,
                    True,
                    before.state,
                    live,
                    epoch,
                    before.attempts,
                    before.budget_used_s,
                    before.lease_until > self.now,
                    False,
                    before.revision,
                    max(taken) if taken else None,
                    predecessors,
                )
            )
        return found

    async def write(self, outcomes: Sequence[Outcome]) -> list[bool]:
        self._check()
        applied = []
        for outcome in outcomes:
            row = self.rows.get(outcome.message_id)
            ok = row is not None and row.lease_epoch == outcome.epoch and row.state is S.DELIVERING
            applied.append(ok)
            if not ok or row is None:
                continue
            row.state = outcome.state
            row.attempts = outcome.attempts
            row.budget_used_s = outcome.budget_used_s
            row.upstream_transaction_id = (
                outcome.upstream_transaction_id or row.upstream_transaction_id
            )
            row.last_error = outcome.last_error or row.last_error
            row.parked_behind = outcome.parked_behind
            row.lease_until = (
                self.now + outcome.renew_lease_s if outcome.renew_lease_s is not None else 0.0
            )
            if outcome.dead_letter is not None:
                row.dead_letter_id = outcome.dead_letter.dead_letter_id
                self.dead_letters[row.dead_letter_id] = outcome.dead_letter
                self.dead_letter_status[row.dead_letter_id] = "open"
            if outcome.hold is not None:
                self.holds.append(outcome.hold)
            if outcome.state is not S.DELIVERING:
                row.history.append((str(outcome.state), outcome.detail))
        return applied

    async def record_untrusted(self, rows: Sequence[DeadLetterRow]) -> list[None]:
        self._check()
        keys = {d.dedupe_key for d in self.dead_letters.values()}
        for row in rows:
            if row.dedupe_key not in keys:
                self.dead_letters[row.dead_letter_id] = row
                self.dead_letter_status[row.dead_letter_id] = "open"
        return [None] * len(rows)

    async def record_late_taken(self, late: LateTaken) -> bool:
        row = self.rows[late.message_id]
        if row.state is not S.DEAD_LETTERED or row.dead_letter_id is None:
            return False
        if self.dead_letter_status.get(row.dead_letter_id) != "open":
            return False
        if self.dead_letters[row.dead_letter_id].reason not in UNCERTAIN_REASONS:
            return False
        self.dead_letter_status[row.dead_letter_id] = "resolved"
        row.state = late.state
        return True

    async def sweep_expired(self) -> int:
        return 0

    def settled(self, message_id: str) -> bool:
        return self.rows[message_id].state in FINAL_STATES


class FakeBroker:
    """Takes records (acks=all) or, when told to, fails like a broker that does not answer."""

    def __init__(self) -> None:
        self.records: list[OutgoingRecord] = []
        self.failing = False

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None:
        if self.failing:
            raise PublishFailed("TimeoutError")
        self.records.extend(records)

    async def send_built(self, batches: Sequence[BuiltBatch], *, what: str = "") -> None:
        """Record batches built elsewhere, read back into their records."""
        if self.failing:
            raise PublishFailed("TimeoutError")
        for topic, _partition, buffer, _count in batches:
            self.records.extend(
                (topic, r.key, r.value, list(r.headers)) for r in DefaultRecordBatch(buffer)
            )

    async def partitions(self, topics: Iterable[str]) -> dict[str, list[int]]:
        if self.failing:
            raise TimeoutError
        return {t: [0, 1, 2, 3] for t in topics}

    async def ping(self) -> None:
        if self.failing:
            raise TimeoutError

    async def stop(self) -> None:
        return None


class FakeUpstream:
    """Answers POSTs from a script per message id (the last answer repeats); counts POSTs."""

    class Unavailable(Exception):
        pass

    def __init__(self, default: Answer) -> None:
        self.default = default
        self.scripts: dict[str, list[Answer]] = {}
        self.posts: list[str] = []
        self.token_down = False
        self.gate: asyncio.Event | None = None  # when set, a POST waits for it
        self.down: Answer | None = None  # when set, every POST gets this answer (an outage)

    async def token(self) -> str:
        if self.token_down:
            raise FakeUpstream.Unavailable("token endpoint unreachable")
        return "token"

    async def renew(self, stale: str) -> None:
        return None

    async def post(self, body: bytes, message_id: str, trace_id: str, token: str) -> Answer:
        self.posts.append(message_id)
        if self.gate is not None:
            await self.gate.wait()
        if self.down is not None:
            return self.down
        script = self.scripts.get(message_id)
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        return self.default


def taken(txn: str = "TX-1", position: str | None = None, status: int = 201) -> Answer:
    from workers.rules import AnswerKind

    return Answer(
        AnswerKind.TAKEN,
        status,
        transaction_id=txn,
        created=status == 201,
        position=Decimal(position) if position is not None else None,
        position_known="given" if position is not None else "absent",
    )


@dataclass
class Consumed:
    """A consumed copy, shaped like aiokafka's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]
    timestamp: int = field(default_factory=lambda: int(time.time() * 1000))


class Desk:
    """Accepts records the way the intake does: pending in the ledger, published, accepted."""

    def __init__(
        self, ledger: IntakeLedger, publisher: SettlementPublisher, desk: str = "power-east"
    ) -> None:
        self.ledger = ledger
        self.publisher = publisher
        self.desk = desk

    def canonical(self, raw: dict[str, Any]) -> CanonicalRecord:
        record = validate_record(raw, None)
        assert isinstance(record, CanonicalRecord), record
        return record

    def request(self, raws: Sequence[dict[str, Any]], key: str | None = None) -> Request:
        """The ledger's view of one batch request, as the intake builds it."""
        envelopes = [envelope_for(self.desk, self.canonical(raw)) for raw in raws]
        batch_id = f"batch_{uuid.uuid4().hex}"
        return Request(
            batch_id=batch_id,
            desk=self.desk,
            trader="trader-1",
            settlement_run_id=self.canonical(raws[0]).settlement_run_id,
            idempotency_key=key or batch_id,
            request_hash="|".join(e.message_id for e in envelopes),
            trace_id="trace-" + batch_id[-8:],
            resource_kind="batch",
            resource_id=batch_id,
            status_url=f"/v1/batches/{batch_id}",
            records=[
                RecordToAccept(
                    i,
                    e.message_id,
                    e.identity,
                    e.contract_id,
                    e.market,
                    e.revision,
                    self.publisher.topic_for(e),
                    e.position_mwh,
                    e.value,
                )
                for i, e in enumerate(envelopes)
            ],
            pending_lease_s=30.0,
            key_lease_s=30.0,
        )

    async def accept(self, raws: Sequence[dict[str, Any]]) -> list[str]:
        """Accept and publish; returns the message ids in request order."""
        request = self.request(raws)
        pending = await self.ledger.begin(request)
        assert isinstance(pending, Pending), pending
        by_id = {r.message_id: r for r in request.records}
        publication = self.publisher.publication_for(
            desk=self.desk, trader="trader-1", trace_id=request.trace_id, batch_id=request.batch_id
        )
        await self.publisher.kafka.send_all(
            [
                publication.record(
                    Envelope(
                        r.message_id,
                        r.identity,
                        r.contract_id,
                        r.market,
                        r.revision,
                        r.position_mwh,
                        r.value,
                    )
                )
                for r in pending.to_publish
            ]
        )
        assert await self.ledger.complete(request, Actor("trader", "trader-1"), len(by_id))
        return [r.message_id for r in request.records]


class FakeCircuitStore:
    """The shared breaker row and the maintenance windows in memory (ledger.upstream)."""

    def __init__(self) -> None:
        self.circuit = Circuit(CircuitState.CLOSED, datetime.now(UTC))
        self.windows: list[MaintenanceWindow] = []
        self.events: list[object] = []

    async def view(self) -> UpstreamView:
        now = datetime.now(UTC)
        current = tuple(w for w in self.windows if w.cancelled_at is None and w.ends_at > now)
        return UpstreamView(self.circuit, current, now)

    async def apply(
        self, events: Sequence[Any], step: Callable[[Circuit, Any, datetime], Circuit]
    ) -> list[Circuit]:
        now = datetime.now(UTC)
        after = []
        for event in events:
            self.events.append(event)
            self.circuit = step(self.circuit, event, now)
            after.append(self.circuit)
        return after
