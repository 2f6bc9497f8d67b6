"""Which offsets may be committed: per partition, everything before the first record that has
not reached a final state (and had that state written to the ledger). Plain values only.

Records finish out of order (different contracts run concurrently, one may be waiting out its
retry budget); the commit point of a partition only ever moves over a contiguous run of
finished records, so a crash re-reads exactly what was not finished.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

PartitionKey = tuple[str, int]  # (topic, partition)


class _Partition:
    __slots__ = ("commit_at", "finished", "pending")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # offsets in consume order
        self.finished: set[int] = set()
        self.commit_at: int | None = None  # next offset to commit, once it moved


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[PartitionKey, _Partition] = {}
        self._advanced: set[PartitionKey] = set()

    @property
    def in_flight(self) -> int:
        return sum(len(p.pending) for p in self._partitions.values())

    def track(self, partition: PartitionKey, offset: int) -> None:
        state = self._partitions.setdefault(partition, _Partition())
        if state.pending and offset <= state.pending[-1]:
            return  # re-read after a rewind: already tracked
        state.pending.append(offset)

    def finish(self, partition: PartitionKey, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is None:
            return  # the partition was revoked meanwhile; its new owner re-reads it
        state.finished.add(offset)
        while state.pending and state.pending[0] in state.finished:
            done = state.pending.popleft()
            state.finished.discard(done)
            state.commit_at = done + 1
            self._advanced.add(partition)

    def committable(self) -> dict[PartitionKey, int]:
        """Partitions whose commit point moved since the last call, with the offset to commit."""
        ready = {
            p: state.commit_at
            for p in self._advanced
            if (state := self._partitions.get(p)) is not None and state.commit_at is not None
        }
        self._advanced.clear()
        return ready

    def forget(self, partitions: Iterable[PartitionKey]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._advanced.discard(partition)
