"""The small parts the intake and the workers are built from, one at a time: the group
committer, the lane slots, the per-desk rate limit and the authentication-failure alarm."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.exc import DataError

from ingest.limits import DeskRateLimiter, FailureAlarm
from runtime.aio import RECANCEL_S, stop_tasks
from tests.fakes import DatabaseAway
from workers.batching import BadItem, GroupCommitter
from workers.pipeline import Chain
from workers.slots import LaneSlots

# -- group commit --------------------------------------------------------------------------


class Table:
    """Refuses any group containing a negative number (for its content); away when told."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.away = 0  # fail this many calls as infrastructure

    async def write(self, items: Sequence[int]) -> list[int]:
        if self.away:
            self.away -= 1
            raise DatabaseAway()
        if any(i < 0 for i in items):
            raise DataError("INSERT", {}, ValueError("negative"))
        self.groups.append(list(items))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]


async def test_what_queues_during_a_write_goes_into_the_next_one() -> None:
    table = Table()
    committer: GroupCommitter[int, int] = GroupCommitter("t", table.write)
    first = committer.submit(1)
    await asyncio.sleep(0)  # the first write starts alone
    rest = [committer.submit(i) for i in range(2, 7)]
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60]
    assert table.groups == [[1], [2, 3, 4, 5, 6]]
    await committer.stop()


async def test_a_bad_item_is_refused_alone_and_the_rest_go_in() -> None:
    table = Table()
    committer: GroupCommitter[int, int] = GroupCommitter("t", table.write)
    futures = [committer.submit(i) for i in (1, 2, -3, 4, 5)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[:2] == [10, 20]
    assert results[3:] == [40, 50]
    assert isinstance(results[2], BadItem)
    assert sorted(i for group in table.groups for i in group) == [1, 2, 4, 5]
    await committer.stop()


async def test_the_database_away_delays_a_group_but_drops_nothing() -> None:
    table = Table()
    table.away = 2
    committer: GroupCommitter[int, int] = GroupCommitter(
        "t", table.write, retry_delay_s=0.01, max_retry_delay_s=0.02
    )
    assert await asyncio.gather(*(committer.submit(i) for i in (1, 2, 3))) == [10, 20, 30]
    assert committer.failures == 2
    await committer.drained()
    await committer.stop()


# -- lane slots ----------------------------------------------------------------------------


@given(
    capacity=st.integers(1, 6),
    share=st.floats(0.1, 0.9),
    lanes=st.lists(st.sampled_from(["priority", "standard"]), min_size=1, max_size=30),
)
def test_slots_never_exceed_capacity_and_serve_every_waiter(
    capacity: int, share: float, lanes: list[str]
) -> None:
    slots = LaneSlots(capacity, share)
    held_most = 0
    served: list[str] = []

    async def one(lane: str) -> None:
        nonlocal held_most
        async with slots.slot(lane):
            held_most = max(held_most, capacity - slots.free)
            await asyncio.sleep(0)
            served.append(lane)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(lane) for lane in lanes)), 5)

    asyncio.run(run())
    assert held_most <= capacity
    assert sorted(served) == sorted(lanes)
    assert slots.free == capacity


async def test_priority_is_served_first_without_starving_the_standard_lane() -> None:
    slots = LaneSlots(4, 0.5)
    order: list[str] = []
    gate = asyncio.Event()

    async def one(lane: str, hold: bool = False) -> None:
        async with slots.slot(lane):
            order.append(lane)
            if hold:
                await gate.wait()

    blockers = [asyncio.create_task(one("standard", hold=True)) for _ in range(4)]
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(one(lane)) for lane in ["standard"] * 4 + ["priority"] * 4]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*blockers, *waiting)
    after = order[4:]
    assert after[0] == "priority"  # a freed slot goes to the priority lane first
    assert "standard" in after[:4]  # ...but the standard lane keeps its share


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    slots = LaneSlots(1, 0.5)
    gate = asyncio.Event()

    async def holder() -> None:
        async with slots.slot("standard"):
            await gate.wait()

    held = asyncio.create_task(holder())
    await asyncio.sleep(0)

    async def waiter() -> None:
        async with slots.slot("priority"):
            pass

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    gate.set()
    await held
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.free == 1


# -- limits at the door ----------------------------------------------------------------------


def test_a_desk_gets_its_burst_then_waits_and_other_desks_are_unaffected() -> None:
    limiter = DeskRateLimiter((100.0, 5), {"slow": (0.5, 2)})
    assert [limiter.retry_after("slow") for _ in range(2)] == [None, None]
    wait = limiter.retry_after("slow")
    assert wait is not None
    assert 1.0 < wait <= 2.0
    assert all(limiter.retry_after("fast") is None for _ in range(5))


def test_the_limiter_knows_whether_other_desks_were_served_lately() -> None:
    limiter = DeskRateLimiter((100.0, 5), {})
    assert not limiter.others_seen("east", 1.0)
    limiter.retry_after("east")
    assert not limiter.others_seen("east", 1.0)  # its own requests do not count
    assert limiter.others_seen("west", 1.0)
    time.sleep(0.06)
    assert not limiter.others_seen("west", 0.05)
    assert limiter.others_seen("west", 1.0)


def test_the_alarm_rings_once_per_window_per_source() -> None:
    alarm = FailureAlarm(threshold=3, window_s=60)
    rings = [alarm.failed("10.0.0.1", "bad signature") for _ in range(6)]
    assert rings == [False, False, True, False, False, False]
    assert alarm.failed("10.0.0.2", "expired") is False


# -- stopping background tasks ------------------------------------------------------------------


async def _swallows_cancellations(times: int, released: asyncio.Event | None = None) -> None:
    """A loop that, like a task whose asyncio.wait_for dropped a cancellation, carries on
    (`times` times, or until `released`)."""
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if swallowed >= times or (released is not None and released.is_set()):
                raise
            swallowed += 1


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    task = asyncio.create_task(_swallows_cancellations(2), name="committer")
    await asyncio.sleep(0)
    # cancelled once and awaited, as the worker's stop did: it never ends (and stop_tasks's
    # own first cancel is swallowed too: only cancelling again ends it)
    task.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 1.0)
    started = time.monotonic()
    assert await stop_tasks([task], timeout_s=5.0) == []
    assert task.cancelled()
    assert time.monotonic() - started < 2 * RECANCEL_S + 1.0


async def test_a_task_that_will_not_stop_is_named_within_the_bound() -> None:
    released = asyncio.Event()
    stubborn = asyncio.create_task(_swallows_cancellations(10**9, released), name="stubborn")
    quick = asyncio.create_task(asyncio.sleep(60), name="quick")
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await stop_tasks([stubborn, quick], timeout_s=1.0) == ["stubborn"]
    assert time.monotonic() - started < 3.0
    assert quick.cancelled()
    assert not stubborn.done()
    released.set()  # the test's own clean-up
    assert await stop_tasks([stubborn], timeout_s=5.0) == []


async def test_a_caller_cancelled_while_stopping_tasks_is_cancelled() -> None:
    """The cancellation of whoever waits in stop_tasks propagates (first_of and a lane's stop
    used to await their cancelled children under suppress(BaseException), which swallowed it)."""
    released = asyncio.Event()
    stubborn = asyncio.create_task(_swallows_cancellations(10**9, released), name="stubborn")
    caller = asyncio.create_task(stop_tasks([stubborn], timeout_s=30.0))
    await asyncio.sleep(0.1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    released.set()
    assert await stop_tasks([stubborn], timeout_s=5.0) == []


async def test_a_chain_pausing_as_it_is_stopped_and_cancelled_stays_cancelled() -> None:
    """A worker's stop sets every chain's `stopped` and cancels its task in the same instant:
    the pause must end in the cancellation, not return as if only the stop had come (with
    asyncio.wait_for, in Python 3.11, it returned, and the chain's loop went on)."""
    chain = Chain(("lane", 0, "CONTRACT-1"))
    task = asyncio.create_task(chain.pause(30))
    await asyncio.sleep(0)
    chain.stopped.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
