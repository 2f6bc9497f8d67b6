"""Typed rows the ledger takes and gives: plain values, no SQL, so the workers' decision core
and the tests can use them without a database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.states import CircuitState, MessageState, Sequencing


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it: a trader or operator (from their token), a worker, or the system."""

    kind: str  # 'trader', 'operator', 'worker', 'system'
    name: str
    desk: str | None = None
    token_id: str | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    actor: Actor
    action: str
    state: str | None = None
    message_id: str | None = None
    batch_id: str | None = None
    subject_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    message_id: str
    publication: str | None
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Predecessors:
    """Earlier-accepted records of the same desk and contract that are not settled."""

    waiting: int = 0  # pending, queued or delivering (normal order)
    replaying: int = 0  # queued or delivering again by an operator's replay
    parked: int = 0
    dead_open: int = 0  # dead-lettered, the dead letter still open (or being replayed)
    blocker: str | None = None  # the earliest blocking record (the head of its contract)
    ahead: str | None = None  # the earliest one still pending, queued or delivering

    def hold_back(self, sequencing: Sequencing) -> bool:
        """The record waits for these (it is neither sent nor parked). The claim statement
        applies the same rule, so such a record's lease is not even taken: waiting is a read."""
        if sequencing is Sequencing.CONTRACT:
            return not (self.dead_open or self.parked) and bool(self.waiting or self.replaying)
        return bool(self.waiting)


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """What one claim statement saw of one copy, and whether it took the lease."""

    message_id: str
    exists: bool
    state: MessageState | None
    live_copy: bool
    epoch: int | None  # set when this statement claimed the lease
    attempts: int  # POSTs before this claim
    budget_used_s: float
    lease_live: bool
    pending_expired: bool
    revision: int
    max_taken_revision: int | None
    predecessors: Predecessors
    first_attempt_at: datetime | None = None

    @property
    def claimed(self) -> bool:
        return self.epoch is not None


@dataclass(frozen=True, slots=True)
class HoldRow:
    hold_id: str
    message_id: str
    desk: str
    contract_id: str
    submitted: Decimal
    reconciled: Decimal | None
    variance: Decimal | None
    reason: str  # 'drift' | 'reconciled position unreadable' | 'no transaction id'


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A dead letter as data: why, and the consumed record exactly as it arrived."""

    dead_letter_id: str
    dedupe_key: str
    reason: str
    error_status: int | None
    attempts: int
    last_error: str
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    source_topic: str
    source_partition: int
    source_offset: int
    kafka_key: bytes | None
    kafka_value: bytes
    headers: Sequence[tuple[str, bytes | None]]
    message_id: str | None = None
    desk: str | None = None
    settlement_run_id: str | None = None
    contract_id: str | None = None


@dataclass(slots=True)
class Outcome:
    """A fenced write about one record under the lease `epoch`: a final state, parking, a
    release of the lease (back to `queued`), or progress while retrying (renews the lease)."""

    message_id: str
    epoch: int
    state: MessageState
    attempts: int
    budget_used_s: float
    detail: str | None = None
    upstream_transaction_id: str | None = None
    last_error: str | None = None
    reconciled_position_mwh: Decimal | None = None
    last_attempt_at: datetime | None = None
    renew_lease_s: float | None = None  # progress: keep the lease this much longer
    dead_letter_id: str | None = None  # the dead letter written with this outcome
    parked_behind: str | None = None  # parking: the record of its contract it waits behind
    hold: HoldRow | None = None
    dead_letter: DeadLetterRow | None = None
    events: list[AuditEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LateTaken:
    """An answer that showed a record taken, received under a lease that was lost meanwhile."""

    message_id: str
    state: MessageState  # delivered | held
    upstream_transaction_id: str | None
    reconciled_position_mwh: Decimal | None
    detail: str
    hold: HoldRow | None


@dataclass(frozen=True, slots=True)
class DeadLetterToPublish:
    dead_letter_id: str
    kafka_key: bytes | None
    kafka_value: bytes
    headers: list[tuple[str, bytes | None]]
    error: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Circuit:
    """The upstream circuit breaker's shared row (operations.circuit says how it moves)."""

    state: CircuitState
    since: datetime
    reason: str | None = None  # why it opened: 'failures' or 'announced'
    failures: int = 0  # transient failures in a row within the current window
    window_started: datetime | None = None
    next_probe_at: datetime | None = None
    probe_owner: str | None = None
    probe_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    window_id: str
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """The breaker and the windows not yet over, as read at `read_at` (the database's clock)."""

    circuit: Circuit
    windows: tuple[MaintenanceWindow, ...]
    read_at: datetime
