"""The delivery decision core: what to do with a consumed copy given what the ledger says
(`decide_claim`), and what an upstream answer means for it (`decide_answer`). Plain values in,
plain values out — no Kafka, HTTP or SQL — so the rules can be tested exhaustively.

The promises they keep (issue #6):
- I3 at most one effect: only the live copy of a record, under a lease, is ever sent; a lower
  revision than one the upstream took is superseded, never sent; a record that any answer
  showed taken is settled as delivered or held, never dead-lettered;
- I4 order per contract: a record is sent only when every earlier-accepted record of its
  contract is settled; with contract sequencing, a record behind an open dead letter of its
  contract is parked instead;
- budgets: attempts and retry time carry over from claim to claim; past either, the record is
  dead-lettered (an honest `retries_exhausted` when no answer said otherwise);
- a drifted or unknown reconciled position ends `held` for an analyst: `delivered` needs an
  answer that either gave a position within the threshold or made the effect itself (201).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ledger.rows import ClaimRow
from schemas.states import (
    FINAL_STATES,
    DeadLetterReason,
    MessageState,
    Sequencing,
)
from workers.rules import Answer, AnswerKind, backoff_delay, drift, is_superseded


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int
    budget_s: float
    backoff_base_s: float
    backoff_cap_s: float
    drift_threshold: Decimal
    sequencing: Sequencing = Sequencing.OFF


# -- what to do with a copy ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """The lease is ours: send. `attempts` counts the POST about to go out."""

    epoch: int
    attempts: int
    budget_used_s: float
    first_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Nothing to do for this copy; its offset may be committed."""

    why: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Not now: try this copy again later (releasing the lease if this claim took it)."""

    why: str
    release: bool = False
    behind: str | None = None  # the earlier record of its contract it waits for, if known


@dataclass(frozen=True, slots=True)
class Supersede:
    detail: str


@dataclass(frozen=True, slots=True)
class Park:
    blocker: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Claimed, but earlier claims already spent its attempts or time: dead-letter, no POST."""

    detail: str


@dataclass(frozen=True, slots=True)
class NotAccepted:
    """A signed copy with no accepted record behind it: a dead letter, never a delivery."""

    detail: str


@dataclass(frozen=True, slots=True)
class AbortExpired:
    """The acceptance overstayed its lease (its intake died or stalled): abort it, look again."""


ClaimVerdict = Send | Finish | Wait | Supersede | Park | Exhausted | NotAccepted | AbortExpired


WAITS_FOR_EARLIER = "an earlier record of its contract is not settled"


def decide_claim(row: ClaimRow, policy: Policy) -> ClaimVerdict:
    if not row.exists:
        return NotAccepted("no accepted record carries this message id")
    state = row.state
    if not row.live_copy:
        return Finish("a stale copy: the record was published again since")
    if state is MessageState.PENDING:
        return AbortExpired() if row.pending_expired else Wait("its acceptance is in progress")
    if state is MessageState.ABORTED:
        return Finish("its request was not accepted (503)")
    if state in FINAL_STATES or state is MessageState.PARKED:
        return Finish(f"already {state}")
    before = row.predecessors
    superseded = is_superseded(row.revision, row.max_taken_revision)
    if row.epoch is None:
        if state is MessageState.DELIVERING and row.lease_live:
            return Wait("another worker holds its lease")
        if not superseded and before.hold_back(policy.sequencing):
            # The claim did not take the lease for a wait.
            return Wait(WAITS_FOR_EARLIER, behind=before.ahead)
        return Wait("its state changed while claiming")
    # The lease is ours from here on; whatever is decided is written under it.
    if superseded:
        return Supersede(f"revision {row.revision} < delivered revision {row.max_taken_revision}")
    if before.hold_back(policy.sequencing):
        return Wait(WAITS_FOR_EARLIER, release=True, behind=before.ahead)
    if policy.sequencing is Sequencing.CONTRACT and (before.dead_open or before.parked):
        return Park(before.blocker, "behind a dead letter of its contract")
    if row.attempts >= policy.max_attempts:
        return Exhausted(f"{row.attempts} attempt(s) already made")
    if row.budget_used_s >= policy.budget_s:
        return Exhausted(f"retry budget of {policy.budget_s:g}s already spent")
    return Send(row.epoch, row.attempts + 1, row.budget_used_s, row.first_attempt_at)


# -- what an answer means ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A delivery in progress under one lease."""

    attempts: int  # POSTs sent so far, the last one included
    budget_used_s: float  # retry time spent, across claims
    renewed_token: bool = False


@dataclass(frozen=True, slots=True)
class Settle:
    """Taken by the upstream: `delivered`, or `held` for an analyst."""

    state: MessageState
    transaction_id: str | None
    reconciled: Decimal | None
    variance: Decimal | None
    hold_reason: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: DeadLetterReason
    status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    renew_token: bool = False


Decision = Settle | DeadLetter | Retry


def settle(answer: Answer, submitted: Decimal, threshold: Decimal) -> Settle:
    txn = answer.transaction_id
    what = f"transaction {txn}" if txn else f"answered {answer.status} without a transaction"
    if answer.position_known == "given":
        assert answer.position is not None
        variance = drift(submitted, answer.position, threshold)
        if variance is None and txn is not None:
            return Settle(MessageState.DELIVERED, txn, answer.position, None, None, what)
        if variance is not None:
            return Settle(
                MessageState.HELD,
                txn,
                answer.position,
                variance,
                "drift",
                f"reconciled {answer.position} vs submitted {submitted} (variance {variance})",
            )
        return Settle(MessageState.HELD, txn, answer.position, None, "no transaction id", what)
    if txn is not None and answer.position_known == "absent":
        # Taken, with no position to check (CONTRACT §4: a 201, or a 200/409 with a transaction
        # id for a key the upstream already has, is delivered; a hold is for a position that
        # differs). On a 200/409 an earlier answer was lost — which may have carried a drift
        # — so the record's history says the check did not run, for an analyst to see.
        if not answer.created:
            what += f"; answered {answer.status} with no reconciled position: drift not checked"
        return Settle(MessageState.DELIVERED, txn, None, None, None, what)
    why = "reconciled position unreadable" if txn is not None else "no transaction id"
    # The upstream took it but said too little, or something unreadable: the drift check cannot
    # run on what it said, so an analyst must look.
    return Settle(MessageState.HELD, txn, None, None, why, f"{what}; {why}")


def decide_answer(
    answer: Answer,
    progress: Progress,
    *,
    submitted: Decimal,
    policy: Policy,
    rng: random.Random,
) -> Decision:
    if answer.kind is AnswerKind.TAKEN:
        return settle(answer, submitted, policy.drift_threshold)
    if answer.kind is AnswerKind.REJECTED:
        return DeadLetter(DeadLetterReason.UPSTREAM_REJECTED, answer.status, answer.error)
    if answer.kind is AnswerKind.UNAUTHORIZED:
        if progress.renewed_token or progress.budget_used_s >= policy.budget_s:
            return DeadLetter(DeadLetterReason.TOKEN_UNAVAILABLE, answer.status, answer.error)
        if progress.attempts >= policy.max_attempts:
            return DeadLetter(DeadLetterReason.RETRIES_EXHAUSTED, answer.status, answer.error)
        return Retry(0.0, renew_token=True)
    return _retry_or_give_up(answer, progress, policy, rng, DeadLetterReason.RETRIES_EXHAUSTED)


def decide_token_failure(
    error: str, progress: Progress, *, policy: Policy, rng: random.Random
) -> Decision:
    """No access token could be obtained: wait and try again within the time budget (no POST
    was sent, so no attempt is spent)."""
    answer = Answer(AnswerKind.TRANSIENT, None, error)
    return _retry_or_give_up(
        answer, progress, policy, rng, DeadLetterReason.TOKEN_UNAVAILABLE, count_attempts=False
    )


def _retry_or_give_up(
    answer: Answer,
    progress: Progress,
    policy: Policy,
    rng: random.Random,
    reason: DeadLetterReason,
    *,
    count_attempts: bool = True,
) -> Decision:
    if count_attempts and progress.attempts >= policy.max_attempts:
        return DeadLetter(reason, answer.status, answer.error)
    delay = backoff_delay(
        max(1, progress.attempts),
        base=policy.backoff_base_s,
        cap=policy.backoff_cap_s,
        retry_after=answer.retry_after_s,
        rng=rng,
    )
    if progress.budget_used_s + delay >= policy.budget_s:
        return DeadLetter(reason, answer.status, answer.error)
    return Retry(delay)
