"""The delivery decision core (workers.core), exhaustively: what to do with a copy given what
the ledger says, and what an upstream answer means — the promises of issue #6 as properties."""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.rows import ClaimRow, Predecessors
from schemas.states import TAKEN_UPSTREAM, DeadLetterReason, MessageState, Sequencing
from workers.core import (
    AbortExpired,
    DeadLetter,
    Exhausted,
    Finish,
    NotAccepted,
    Park,
    Policy,
    Progress,
    Retry,
    Send,
    Settle,
    Supersede,
    Wait,
    decide_answer,
    decide_claim,
    decide_token_failure,
)
from workers.rules import Answer, AnswerKind

POLICY = Policy(
    max_attempts=8,
    budget_s=900,
    backoff_base_s=0.5,
    backoff_cap_s=60,
    drift_threshold=Decimal("0.005"),
)
CONTRACT = replace(POLICY, sequencing=Sequencing.CONTRACT)


def row(**changes: object) -> ClaimRow:
    values: dict[str, object] = {
        "message_id": "m",
        "exists": True,
        "state": MessageState.QUEUED,
        "live_copy": True,
        "epoch": 3,
        "attempts": 0,
        "budget_used_s": 0.0,
        "lease_live": False,
        "pending_expired": False,
        "revision": 1,
        "max_taken_revision": None,
        "predecessors": Predecessors(),
    }
    values.update(changes)
    return ClaimRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        ({}, Send),
        ({"exists": False}, NotAccepted),
        ({"live_copy": False}, Finish),
        ({"state": MessageState.PENDING, "epoch": None}, Wait),
        ({"state": MessageState.PENDING, "epoch": None, "pending_expired": True}, AbortExpired),
        ({"state": MessageState.ABORTED, "epoch": None}, Finish),
        ({"state": MessageState.DELIVERED, "epoch": None}, Finish),
        ({"state": MessageState.PARKED, "epoch": None}, Finish),
        ({"state": MessageState.DELIVERING, "epoch": None, "lease_live": True}, Wait),
        ({"revision": 1, "max_taken_revision": 2}, Supersede),
        ({"predecessors": Predecessors(waiting=1)}, Wait),
        ({"predecessors": Predecessors(dead_open=1)}, Send),  # sequencing off: go ahead
        ({"predecessors": Predecessors(replaying=1)}, Send),  # a replay never holds others back
        ({"attempts": 8}, Exhausted),
        ({"budget_used_s": 900.0}, Exhausted),
    ],
)
def test_claim_verdicts(changes: dict[str, object], verdict: type) -> None:
    assert isinstance(decide_claim(row(**changes), POLICY), verdict)


@pytest.mark.parametrize(
    ("predecessors", "verdict"),
    [
        (Predecessors(dead_open=1, blocker="m0"), Park),
        (Predecessors(parked=1, blocker="m0"), Park),
        (Predecessors(replaying=1), Wait),
        (Predecessors(waiting=1), Wait),
        (Predecessors(), Send),
    ],
)
def test_contract_sequencing(predecessors: Predecessors, verdict: type) -> None:
    decided = decide_claim(row(predecessors=predecessors), CONTRACT)
    assert isinstance(decided, verdict)
    if isinstance(decided, Park):
        assert decided.blocker == "m0"


@pytest.mark.parametrize("policy", [POLICY, CONTRACT])
def test_a_claim_that_only_waits_names_the_record_it_waits_for(policy: Policy) -> None:
    before = Predecessors(waiting=2, ahead="m0")
    assert before.hold_back(policy.sequencing)
    unleased = decide_claim(row(epoch=None, predecessors=before), policy)
    assert unleased == Wait("an earlier record of its contract is not settled", behind="m0")
    leased = decide_claim(row(predecessors=before), policy)  # a ledger that leased it anyway
    assert leased == Wait("an earlier record of its contract is not settled", True, "m0")
    # Superseded or parked, it is leased: there is something to write about it.
    assert isinstance(
        decide_claim(row(revision=1, max_taken_revision=2, predecessors=before), policy), Supersede
    )
    parked = Predecessors(waiting=1, dead_open=1, blocker="m0", ahead="m0")
    assert parked.hold_back(policy.sequencing) is (policy.sequencing is Sequencing.OFF)


def test_send_counts_the_post_it_is_about_to_make() -> None:
    decided = decide_claim(row(attempts=2, budget_used_s=12.5), POLICY)
    assert decided == Send(3, 3, 12.5, None)


views = st.builds(
    row,
    exists=st.booleans(),
    state=st.sampled_from(list(MessageState)),
    live_copy=st.booleans(),
    epoch=st.none() | st.integers(1, 9),
    attempts=st.integers(0, 12),
    budget_used_s=st.floats(0, 1200),
    lease_live=st.booleans(),
    pending_expired=st.booleans(),
    revision=st.integers(1, 4),
    max_taken_revision=st.none() | st.integers(1, 4),
    predecessors=st.builds(
        Predecessors,
        waiting=st.integers(0, 2),
        replaying=st.integers(0, 2),
        parked=st.integers(0, 2),
        dead_open=st.integers(0, 2),
    ),
)


@given(views, st.sampled_from([POLICY, CONTRACT]))
def test_a_copy_is_sent_only_when_every_promise_allows_it(view: ClaimRow, policy: Policy) -> None:
    decided = decide_claim(view, policy)
    if not isinstance(decided, Send):
        return
    assert view.exists, "only an accepted record"
    assert view.live_copy, "only the live copy of it"
    assert view.epoch is not None, "only under a lease this claim took"
    assert view.state in (MessageState.QUEUED, MessageState.DELIVERING)
    assert not (view.max_taken_revision and view.revision < view.max_taken_revision)
    assert view.predecessors.waiting == 0, "never before an earlier record of its contract"
    if policy.sequencing is Sequencing.CONTRACT:
        p = view.predecessors
        assert p.dead_open == p.parked == p.replaying == 0
    assert view.attempts < policy.max_attempts
    assert view.budget_used_s < policy.budget_s


@given(views, st.sampled_from([POLICY, CONTRACT]))
def test_a_settled_record_is_never_touched(view: ClaimRow, policy: Policy) -> None:
    if view.state in (*TAKEN_UPSTREAM, MessageState.SUPERSEDED, MessageState.DEAD_LETTERED):
        assert isinstance(decide_claim(view, policy), Finish | NotAccepted)


def _answer(kind: AnswerKind, position: Decimal | None, unreadable: bool, **rest: object) -> Answer:
    known = "given" if position is not None else "unreadable" if unreadable else "absent"
    return Answer(kind, position=position, position_known=known, **rest)  # type: ignore[arg-type]


answers = st.builds(
    _answer,
    kind=st.sampled_from(list(AnswerKind)),
    position=st.none() | st.decimals(-1000, 1000, places=3),
    unreadable=st.booleans(),
    status=st.none() | st.sampled_from([200, 201, 202, 400, 401, 409, 422, 429, 500, 503]),
    error=st.text(max_size=20),
    transaction_id=st.none() | st.just("TX-1"),
    created=st.booleans(),
    retry_after_s=st.none() | st.floats(0, 2000),
)
progresses = st.builds(
    Progress,
    attempts=st.integers(1, 10),
    budget_used_s=st.floats(0, 1000),
    renewed_token=st.booleans(),
)


@given(answers, progresses, st.integers(0, 2**32))
def test_an_answer_showing_the_record_taken_never_dead_letters_it(
    answer: Answer, progress: Progress, seed: int
) -> None:
    decided = decide_answer(
        answer, progress, submitted=Decimal(100), policy=POLICY, rng=random.Random(seed)
    )
    if answer.kind is AnswerKind.TAKEN:
        assert isinstance(decided, Settle)
        assert decided.state in (MessageState.DELIVERED, MessageState.HELD)
        if decided.state is MessageState.DELIVERED:
            # Delivered needs a drift check that passed, or the effect made by this very POST.
            assert answer.transaction_id is not None
            assert answer.position_known == "given" or (
                answer.created and answer.position_known == "absent"
            )
    elif answer.kind is AnswerKind.REJECTED:
        assert decided == DeadLetter(
            DeadLetterReason.UPSTREAM_REJECTED, answer.status, answer.error
        )


@given(answers, progresses, st.integers(0, 2**32))
def test_retries_stay_within_attempts_and_budget(
    answer: Answer, progress: Progress, seed: int
) -> None:
    decided = decide_answer(
        answer, progress, submitted=Decimal(100), policy=POLICY, rng=random.Random(seed)
    )
    if isinstance(decided, Retry):
        assert progress.attempts < POLICY.max_attempts
        assert progress.budget_used_s + decided.delay_s < POLICY.budget_s
        if answer.retry_after_s is not None and not decided.renew_token:
            assert decided.delay_s >= answer.retry_after_s  # honoured as given


@pytest.mark.parametrize(
    ("answer", "state", "reason"),
    [
        (Answer(AnswerKind.TAKEN, 201, transaction_id="T", created=True), "delivered", None),
        (
            Answer(
                AnswerKind.TAKEN,
                201,
                transaction_id="T",
                created=True,
                position=Decimal("100.4"),
                position_known="given",
            ),
            "delivered",
            None,
        ),
        (
            Answer(
                AnswerKind.TAKEN,
                201,
                transaction_id="T",
                created=True,
                position=Decimal(102),
                position_known="given",
            ),
            "held",
            "drift",
        ),
        # A 200 or 409 with a transaction id for a key the upstream already has, and no
        # position: delivered (CONTRACT §4), its history saying the drift check did not run.
        (Answer(AnswerKind.TAKEN, 200, transaction_id="T"), "delivered", None),
        (Answer(AnswerKind.TAKEN, 409, transaction_id="T"), "delivered", None),
        (
            Answer(
                AnswerKind.TAKEN, 201, transaction_id="T", created=True, position_known="unreadable"
            ),
            "held",
            "reconciled position unreadable",
        ),
        (Answer(AnswerKind.TAKEN, 201, created=True), "held", "no transaction id"),
    ],
)
def test_settling(answer: Answer, state: str, reason: str | None) -> None:
    decided = decide_answer(
        answer, Progress(1, 0.0), submitted=Decimal(100), policy=POLICY, rng=random.Random(1)
    )
    assert isinstance(decided, Settle)
    assert decided.state == state
    assert decided.hold_reason == reason


def test_unauthorized_renews_once_then_gives_up() -> None:
    answer = Answer(AnswerKind.UNAUTHORIZED, 401, "expired")
    first = decide_answer(
        answer, Progress(1, 0.0), submitted=Decimal(1), policy=POLICY, rng=random.Random(1)
    )
    assert first == Retry(0.0, renew_token=True)
    second = decide_answer(
        answer,
        Progress(2, 0.0, renewed_token=True),
        submitted=Decimal(1),
        policy=POLICY,
        rng=random.Random(1),
    )
    assert second == DeadLetter(DeadLetterReason.TOKEN_UNAVAILABLE, 401, "expired")


def test_token_failures_spend_time_not_attempts() -> None:
    decided = decide_token_failure("down", Progress(8, 0.0), policy=POLICY, rng=random.Random(1))
    assert isinstance(decided, Retry)  # 8 attempts counted, yet no POST is spent on a token
    late = decide_token_failure("down", Progress(1, 900.0), policy=POLICY, rng=random.Random(1))
    assert late == DeadLetter(DeadLetterReason.TOKEN_UNAVAILABLE, None, "down")
