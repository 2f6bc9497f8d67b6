"""Housekeeping's choice of what to publish again while the lanes are unsettled
(operations/housekeeping.py): contracts whose later records wait for earlier ones the worker
does not hold, each at most once per interval."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ledger.rows import Actor
from operations.housekeeping import Housekeeping, Intervals


def test_a_waited_for_contract_is_restored_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("operations.housekeeping.time.monotonic", lambda: clock[0])
    asked: list[float] = []
    waiting: dict[tuple[str, str], set[str]] = {("power-east", "C1"): {"m7", "m8"}}

    def waits(longer_than_s: float) -> dict[tuple[str, str], set[str]]:
        asked.append(longer_than_s)
        return waiting

    none = cast(Any, None)
    keeper = Housekeeping(
        engine=none,
        cipher=none,
        publisher=none,
        republisher=none,
        reconciliation_topic="recon",
        actor=Actor("worker", "w1"),
        intervals=Intervals(restore_after_s=10.0, restore_waited_again_s=60.0),
        waiting=waits,
    )
    assert keeper._waited_for() == {("power-east", "C1"): {"m7", "m8"}}
    assert asked == [10.0]  # waited at least restore_after_s
    assert keeper._waited_for() == {("power-east", "C1"): {"m7", "m8"}}  # not restored yet
    keeper._restored({("power-east", "C1")})
    clock[0] += 59.0
    waiting[("gas-west", "C2")] = set()
    assert keeper._waited_for() == {("gas-west", "C2"): set()}  # C1 not again yet
    clock[0] += 1.0
    assert keeper._waited_for() == {("power-east", "C1"): {"m7", "m8"}, ("gas-west", "C2"): set()}
    assert (
        Housekeeping(
            engine=none,
            cipher=none,
            publisher=none,
            republisher=none,
            reconciliation_topic="recon",
            actor=Actor("worker", "w1"),
        )._waited_for()
        == {}
    )  # no pipeline here (the intake, the CLI)
