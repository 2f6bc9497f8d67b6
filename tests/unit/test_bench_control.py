"""The fairness row's control (ops.dev.bench._burner): a process that burns CPU at the lowest
priority Linux has, so that what it does to another desk's reads is the machine's share of the
row. If it ran at the priority of anything else, the control would measure contention the
intake could avoid, and flatter the intake. And the order the row's conditions take turns in."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
from hypothesis import given
from hypothesis import strategies as st

from ops.dev.bench import _burner, _Load, rotations


def _group_niceness(pid: int) -> int | None:
    """Its autogroup's nice value (None where the kernel groups no sessions)."""
    group = Path(f"/proc/{pid}/autogroup")
    return int(group.read_text().split()[-1]) if group.exists() else None


def test_the_control_burns_cpu_only_when_on_and_at_the_lowest_priority() -> None:
    async def check() -> None:
        load = _Load(_burner)
        try:
            await load.wait_ready("the control")
            pid = load.process.pid
            assert pid is not None
            process = psutil.Process(pid)
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
            assert process.nice() == 19
            assert os.getsid(pid) == pid  # a session of its own
            assert _group_niceness(pid) in (19, None)

            idle_before = process.cpu_times().user
            await asyncio.sleep(0.5)
            assert process.cpu_times().user - idle_before < 0.1, "off: nothing burnt"

            before = process.cpu_times().user
            await load.on("the control")  # back once it has burnt its first 0.3 s
            # at SCHED_IDLE it may wait for a busy machine: polled, not timed
            deadline = time.monotonic() + 60
            while process.cpu_times().user - before < 0.25:
                assert time.monotonic() < deadline, "on, it burns CPU"
                await asyncio.sleep(0.1)
            await load.off()
            assert load.sent.value >= 1
        finally:
            await load.close()
        assert not load.process.is_alive()

    asyncio.run(check())


@given(st.integers(1, 6), st.integers(1, 5))
def test_over_whole_turns_every_condition_takes_every_place_equally_often(
    conditions: int, turns: int
) -> None:
    """The fairness row's conditions take turns in `rotations`: no condition is always first
    (after the round before's last load): over whole turns each comes in each place as often."""
    items = list(range(conditions))
    orders = rotations(items, conditions * turns)
    assert all(sorted(order) == items for order in orders)  # each round: each condition once
    for place in range(conditions):
        seen = [order[place] for order in orders]
        assert all(seen.count(item) == turns for item in items)
