"""Delivery slots: how many POSTs a worker has in flight, shared by the two lanes.

Rules kept here (CONTRACT §8 ETRM_WORKER_CONCURRENCY, ETRM_PRIORITY_SHARE):
- at most `capacity` POSTs at once; a slot is held only for the POST itself, never while a
  record waits out a backoff, so records waiting to retry never starve the others;
- when both lanes wait, a freed slot goes to the priority lane, unless the priority lane
  already holds its share of the slots: the standard lane always keeps the rest, so it is
  never starved; an idle lane's slots are free for the other.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

PRIORITY = "priority"
STANDARD = "standard"


class LaneSlots:
    def __init__(self, capacity: int, priority_share: float) -> None:
        self.capacity = capacity
        # The most the priority lane takes while the standard lane is waiting too.
        self.priority_limit = max(1, min(capacity, math.ceil(capacity * priority_share)))
        if capacity > 1:
            self.priority_limit = min(self.priority_limit, capacity - 1)
        self.held = {PRIORITY: 0, STANDARD: 0}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {
            PRIORITY: deque(),
            STANDARD: deque(),
        }

    @property
    def free(self) -> int:
        return self.capacity - self.held[PRIORITY] - self.held[STANDARD]

    def _may_take(self, lane: str) -> bool:
        if self.free <= 0:
            return False
        if lane == PRIORITY:
            return not self._waiting[STANDARD] or self.held[PRIORITY] < self.priority_limit
        # Standard: leave the slot to a waiting priority record that is within its share.
        return not (self._waiting[PRIORITY] and self.held[PRIORITY] < self.priority_limit)

    def _hand_out(self) -> None:
        for lane in (PRIORITY, STANDARD, PRIORITY):
            queue = self._waiting[lane]
            while queue and self._may_take(lane):
                waiter = queue.popleft()
                if waiter.done():
                    continue
                self.held[lane] += 1
                waiter.set_result(None)

    @asynccontextmanager
    async def slot(self, lane: str) -> AsyncIterator[None]:
        lane = PRIORITY if lane == PRIORITY else STANDARD
        if not self._waiting[lane] and self._may_take(lane):
            self.held[lane] += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[lane].append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.held[lane] -= 1  # granted just as we were cancelled
                    self._hand_out()
                raise
        try:
            yield
        finally:
            self.held[lane] -= 1
            self._hand_out()
