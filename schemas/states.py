"""The words of the settlement ledger: message states, dead-letter reasons and statuses, hold
and batch states, and the sets the delivery rules are written in. Python and SQL use these same
values (ledger/tables.py builds its CHECK constraints from them). No I/O.
"""

from __future__ import annotations

from enum import StrEnum


class MessageState(StrEnum):
    # Internal: the intake holds the record while the broker acknowledges it. Never in a body.
    PENDING = "pending"
    # Internal: the broker did not acknowledge (503). Never in a body; a retry may re-accept it.
    ABORTED = "aborted"
    QUEUED = "queued"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    HELD = "held"
    DEAD_LETTERED = "dead_lettered"
    SUPERSEDED = "superseded"
    RELEASED = "released"
    REJECTED = "rejected"
    # Behind a dead letter of its contract (ETRM_SEQUENCE_DEAD_LETTERS=contract); it continues,
    # in order, once the head of its contract is replayed and settled or discarded.
    PARKED = "parked"


S = MessageState

# Reached for good: nothing but an operator (replay of a dead letter, decision on a hold) moves
# a record out of these.
FINAL_STATES = frozenset(
    {S.DELIVERED, S.HELD, S.DEAD_LETTERED, S.SUPERSEDED, S.RELEASED, S.REJECTED}
)
# The upstream has taken the record into its books: a lower revision of the same settlement
# identity must never be sent after one of these.
TAKEN_UPSTREAM = frozenset({S.DELIVERED, S.HELD, S.RELEASED, S.REJECTED})
# States a desk or an operator ever sees in a body.
VISIBLE_STATES = frozenset(set(S) - {S.PENDING, S.ABORTED})
# A worker may take a lease on a record in these (delivering only once the lease expired).
CLAIMABLE = frozenset({S.QUEUED, S.DELIVERING})
# Nothing more will happen to a copy of the record at this point of the partition: its offset
# may be committed (parked continues later from a copy of its own).
SETTLED_FOR_OFFSETS = FINAL_STATES | {S.PARKED, S.ABORTED}


class DeadLetterReason(StrEnum):
    UPSTREAM_REJECTED = "upstream_rejected"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_MESSAGE = "invalid_message"
    TOKEN_UNAVAILABLE = "token_unavailable"  # noqa: S105 - a reason, not a password
    DRIFT_REJECTED = "drift_rejected"


R = DeadLetterReason

# A record the upstream refused or never took can be sent again. Not replayable: a bad
# signature or shape (nothing trustworthy to send) and a rejected drift hold (the upstream
# already booked it; a correction is a new revision from the desk).
REPLAYABLE_REASONS = frozenset({R.UPSTREAM_REJECTED, R.RETRIES_EXHAUSTED, R.TOKEN_UNAVAILABLE})
# Dead letters whose record may still have been taken by the upstream (an answer was lost):
# a late answer that shows it taken closes them (the ledger follows the upstream).
UNCERTAIN_REASONS = frozenset({R.RETRIES_EXHAUSTED, R.TOKEN_UNAVAILABLE})


class DeadLetterStatus(StrEnum):
    OPEN = "open"
    REPLAYING = "replaying"  # claimed by a replay (awaiting approval or running)
    REPLAYED = "replayed"
    DISCARDED = "discarded"  # closed by an operator without delivery
    RESOLVED = "resolved"  # closed because a late upstream answer showed the record taken


def status_filter(value: str | int) -> DeadLetterStatus | int:
    """A dead-letter filter's `status`: the entry's status (`open`, …), or — a number, as text
    or not — the HTTP status the upstream answered it with (`422`). Anything else is refused
    (ValueError), so a misspelt status is not an empty queue."""
    if isinstance(value, str) and value in DeadLetterStatus._value2member_map_:
        return DeadLetterStatus(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    raise ValueError(
        f"must be one of {', '.join(DeadLetterStatus)}, or an HTTP status (100-599) the "
        "upstream answered"
    )


# A dead letter that still holds its contract back in contract sequencing mode.
BLOCKING_DEAD_LETTER = frozenset({DeadLetterStatus.OPEN, DeadLetterStatus.REPLAYING})


class HoldState(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    REJECTED = "rejected"


class BatchState(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    ABORTED = "aborted"


class Publication(StrEnum):
    """How the live Kafka copy of a record came to be."""

    INTAKE = "intake"  # the desk's accepted request
    REPLAY = "replay"  # an operator's replay of a dead letter
    CONTINUATION = "continuation"  # parked records resumed behind a settled head


class Sequencing(StrEnum):
    OFF = "off"
    CONTRACT = "contract"


class ReplayState(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    RUNNING = "running"
    COMPLETED = "completed"


class CircuitState(StrEnum):
    """The upstream circuit breaker, shared by every worker of a group (issue #8)."""

    CLOSED = "closed"  # sending
    OPEN = "open"  # sending nothing until the next probe is due
    HALF_OPEN = "half_open"  # one worker sends one record as a probe


class Waiting(StrEnum):
    """Why a record that is not settled is not being sent right now (`waiting.reason`)."""

    CIRCUIT_OPEN = "circuit_open"
    MAINTENANCE = "maintenance"  # declared by an operator, or announced by the upstream


def sql_values(values: frozenset[str] | type[StrEnum]) -> str:
    """`('a', 'b')` for a CHECK constraint or an IN list; values are module constants."""
    return "(" + ", ".join(f"'{v}'" for v in sorted(str(v) for v in values)) + ")"
