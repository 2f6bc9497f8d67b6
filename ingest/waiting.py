"""Why records that are not settled are not being sent right now (issue #8): the breaker open,
or a maintenance window — read from the ledger at most once a second, so status reads during an
outage cost no more than before it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from ledger.rows import UpstreamView
from operations.circuit import waiting_of
from schemas.api import Waiting
from schemas.records import iso_z
from schemas.states import MessageState

# Not settled yet, and not held back by anything but the upstream.
WAITS_ON_UPSTREAM = frozenset({MessageState.QUEUED, MessageState.DELIVERING})


class WaitingWatch:
    def __init__(self, read: Callable[[], Awaitable[UpstreamView]], ttl_s: float = 1.0) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._at = -1e9
        self._waiting: Waiting | None = None

    async def current(self) -> Waiting | None:
        if time.monotonic() - self._at > self._ttl_s:
            view = await self._read()
            found = waiting_of(view.circuit, view.windows, view.read_at)
            self._waiting = Waiting(reason=found[0].value, until=iso_z(found[1])) if found else None
            self._at = time.monotonic()
        return self._waiting

    async def for_states(self, states: list[MessageState]) -> Waiting | None:
        if not WAITS_ON_UPSTREAM.intersection(states):
            return None
        return await self.current()
