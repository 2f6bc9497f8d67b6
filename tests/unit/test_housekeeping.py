"""Housekeeping's choice of what to publish again while the lanes are unsettled
(operations/housekeeping.py): records that later records of their contract have waited for —
on the waiting copy's own lane or on a lane that has settled after restore_after_s, on any
lane after restore_waited_across_s — each contract at most once per interval."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ledger.reconciliation import Waited
from ledger.rows import Actor
from operations.housekeeping import Housekeeping, Intervals

STD, PRI = "lanes.standard", "lanes.priority"
BUSY = {STD: 5, PRI: 3}  # neither lane settled


def keeper_of(waits: Any) -> Housekeeping:
    none = cast(Any, None)
    return Housekeeping(
        engine=none,
        cipher=none,
        publisher=none,
        republisher=none,
        reconciliation_topic="recon",
        actor=Actor("worker", "w1"),
        intervals=Intervals(
            restore_after_s=10.0, restore_waited_across_s=60.0, restore_waited_again_s=60.0
        ),
        waiting=waits,
    )


def test_what_later_records_wait_for_is_published_again_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("operations.housekeeping.time.monotonic", lambda: clock[0])
    asked: list[float] = []
    waiting: dict[float, dict[tuple[str, str, str], set[str]]] = {
        10.0: {("power-east", "C1", STD): {"m7", "m8"}},
        60.0: {},
    }

    def waits(longer_than_s: float) -> dict[tuple[str, str, str], set[str]]:
        asked.append(longer_than_s)
        return waiting[longer_than_s]

    keeper = keeper_of(waits)
    c1 = Waited(lanes={("power-east", "C1", STD)}, held={"m7", "m8"})
    assert keeper._waited_for(BUSY) == c1  # its own lane only: the other may be a backlog
    assert asked == [10.0, 60.0]
    assert keeper._waited_for(BUSY) == c1  # not restored yet: again
    # The other lane has settled: what is waited for is not there either.
    assert keeper._waited_for({STD: 5, PRI: 0}) == Waited(
        lanes={("power-east", "C1", STD), ("power-east", "C1", PRI)}, held={"m7", "m8"}
    )
    keeper._restored({("power-east", "C1")})
    clock[0] += 59.0
    waiting[10.0][("gas-west", "C2", PRI)] = {"m9"}
    waiting[60.0][("gas-west", "C3", STD)] = set()  # waited long: on any lane
    assert keeper._waited_for(BUSY) == Waited(
        lanes={("gas-west", "C2", PRI), ("gas-west", "C3", STD), ("gas-west", "C3", PRI)},
        held={"m9"},
    )  # C1 not again yet
    clock[0] += 1.0
    assert ("power-east", "C1", STD) in cast(Waited, keeper._waited_for(BUSY)).lanes
    waiting[10.0].clear()
    waiting[60.0].clear()
    assert keeper._waited_for(BUSY) is None
    assert keeper_of(None)._waited_for(BUSY) is None  # no pipeline: the intake, the CLI
