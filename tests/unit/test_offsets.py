"""The commit rule: a partition's commit point never passes a record that has not settled —
under any interleaving of polls (stale ones included), settlements, revocations, re-assignments
and gaps (a Hypothesis state machine against a model of the partition log)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from workers.offsets import OffsetTracker, Ticket, Untracked

P0, P1 = ("t", 0), ("t", 1)


def tracked(tracker: OffsetTracker, partition: tuple[str, int], offset: int) -> Ticket:
    ticket = tracker.track(partition, offset)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def test_commit_point_waits_for_the_first_unfinished_record() -> None:
    tracker = OffsetTracker()
    tracker.assign(P0, 10)
    tracker.assign(P1, 5)
    t10, t11, t12, t13 = (tracked(tracker, P0, offset) for offset in (10, 11, 12, 13))
    p1 = tracked(tracker, P1, 5)
    tracker.finish(t12)  # a later record finished first
    tracker.finish(t11)
    assert tracker.committable() == {}
    tracker.finish(t10)
    assert tracker.committable() == {P0: 13}
    assert tracker.committable() == {}  # reported once
    tracker.finish(p1)
    tracker.finish(t13)
    assert tracker.committable() == {P0: 14, P1: 6}
    assert tracker.in_flight() == 0


def test_a_stale_batch_cannot_leave_a_hole() -> None:
    """Issue #6 case 2: a poll fetched before a rebalance is handled after the partition came
    straight back; the commit point must not pass the records before it."""
    tracker = OffsetTracker()
    tracker.assign(P0, 0)
    first = [tracked(tracker, P0, o) for o in range(5)]
    tracker.revoke([P0])
    tracker.assign(P0, 0)  # back at once, nothing committed
    assert tracker.track(P0, 3) is Untracked.GAP  # the stale batch starts later: seek to 0
    assert tracker.expected(P0) == 0
    for ticket in first:
        tracker.finish(ticket)  # the old generation finishing
    assert tracker.committable() == {}
    fresh = [tracked(tracker, P0, o) for o in range(5)]
    for ticket in fresh[1:]:
        tracker.finish(ticket)
    assert tracker.committable() == {}
    tracker.finish(fresh[0])
    assert tracker.committable() == {P0: 5}


def test_a_real_gap_is_accepted_once_it_persists() -> None:
    tracker = OffsetTracker()
    tracker.assign(P0, 0)
    assert tracker.track(P0, 7) is Untracked.GAP  # perhaps a stale batch: seek back
    assert tracker.track(P0, 7) is Untracked.GAP  # still there after seeking back
    ticket = tracker.track(P0, 7)
    assert isinstance(ticket, Ticket)
    tracker.finish(ticket)
    assert tracker.committable() == {P0: 8}


def test_revoked_partitions_and_re_reads() -> None:
    tracker = OffsetTracker()
    assert tracker.track(P0, 1) is Untracked.STALE  # not assigned
    tracker.assign(P0, 1)
    one = tracked(tracker, P0, 1)
    tracked(tracker, P0, 2)
    assert tracker.track(P0, 1) is Untracked.SEEN  # re-read: not tracked twice
    assert tracker.in_flight() == 2
    tracker.revoke([P0])
    tracker.finish(one)  # finishing after revocation is ignored
    assert tracker.committable() == {}
    assert tracker.in_flight() == 0


class PartitionLog(RuleBasedStateMachine):
    """One partition of LOG records; a consumer that fetches (sometimes stale batches), a
    worker that settles records in any order, commits the broker refuses, rebalances that take
    the partition away and give it back at the committed offset."""

    LOG = 30

    def __init__(self) -> None:
        super().__init__()
        self.tracker = OffsetTracker()
        self.committed = 0
        self.position = 0
        self.assigned = False
        self.tickets: list[Ticket] = []
        self.settled: set[int] = set()  # offsets whose record settled (in any generation)
        # The batch the consumer fetched last: a rebalance may happen before it is handled,
        # and it is handed over once (FastStream polls again only after the handler returns).
        self.unhandled: list[int] | None = None

    @precondition(lambda self: not self.assigned)
    @rule()
    def assign(self) -> None:
        self.tracker.assign(P0, self.committed)
        self.position = self.committed
        self.assigned = True

    @precondition(lambda self: self.assigned)
    @rule()
    def revoke(self) -> None:
        self._commit()
        self.tracker.revoke([P0])
        self.assigned = False

    @precondition(lambda self: self.assigned and self.unhandled is None)
    @rule(count=st.integers(1, 6))
    def fetch(self, count: int) -> None:
        self.unhandled = list(range(self.position, min(self.LOG, self.position + count)))
        self.position += len(self.unhandled)

    @precondition(lambda self: self.unhandled is not None)
    @rule()
    def handle(self) -> None:
        batch, self.unhandled = self.unhandled or [], None
        self._track(batch)

    def _track(self, batch: list[int]) -> None:
        for offset in batch:
            ticket = self.tracker.track(P0, offset)
            if ticket is Untracked.GAP:
                expected = self.tracker.expected(P0)
                assert expected is not None
                self.position = expected  # the consumer seeks back
                return
            if isinstance(ticket, Ticket):
                self.tickets.append(ticket)

    @precondition(lambda self: self.tickets)
    @rule(index=st.integers(0, 100))
    def settle(self, index: int) -> None:
        ticket = self.tickets.pop(index % len(self.tickets))
        self.settled.add(ticket.offset)
        self.tracker.finish(ticket)

    @rule()
    def commit(self) -> None:
        self._commit()
        if self.assigned:  # a commit that goes through brings the partition up to date
            point = self.tracker.commit_points().get(P0)
            assert point is None or self.committed == point, (self.committed, point)

    @precondition(lambda self: self.assigned)
    @rule()
    def commit_refused(self) -> None:
        """The broker refuses a commit (the group rebalancing): nothing is committed, and the
        points are offered again next round."""
        self.tracker.commit_again(self.tracker.committable())

    def _commit(self) -> None:
        for partition, offset in self.tracker.committable().items():
            assert partition == P0
            if self.assigned:
                self.committed = offset

    @invariant()
    def never_past_an_unsettled_record(self) -> None:
        missing = [o for o in range(self.committed) if o not in self.settled]
        assert not missing, f"committed {self.committed} past unsettled {missing[:5]}"


TestPartitionLog = PartitionLog.TestCase
TestPartitionLog.settings = settings(
    max_examples=500, stateful_step_count=80, deadline=None, derandomize=True
)
