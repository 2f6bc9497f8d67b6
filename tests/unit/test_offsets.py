"""Commit points move only over contiguous finished records, per partition."""

from __future__ import annotations

from workers.offsets import OffsetTracker

P0, P1 = ("t", 0), ("t", 1)


def test_commit_point_waits_for_the_first_unfinished_record() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.track(P0, offset)
    tracker.track(P1, 5)
    tracker.finish(P0, 12)  # a later record finished first (another contract)
    tracker.finish(P0, 11)
    assert tracker.committable() == {}
    tracker.finish(P0, 10)
    assert tracker.committable() == {P0: 13}
    assert tracker.committable() == {}  # reported once
    tracker.finish(P1, 5)
    tracker.finish(P0, 13)
    assert tracker.committable() == {P0: 14, P1: 6}
    assert tracker.in_flight == 0


def test_rewound_and_revoked_partitions() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 1)
    tracker.track(P0, 2)
    tracker.track(P0, 1)  # re-read after a rewind: not tracked twice
    assert tracker.in_flight == 2
    tracker.forget([P0])
    tracker.finish(P0, 1)  # a record of a revoked partition finishing later is ignored
    assert tracker.committable() == {}
    assert tracker.in_flight == 0
