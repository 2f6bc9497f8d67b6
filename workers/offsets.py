"""Which offsets may be committed: per partition, everything before the first record that has
not settled. Plain values only.

Rules kept here:
- records finish out of order (different contracts run concurrently); a partition's commit
  point only ever moves over a contiguous run of finished records;
- each assignment of a partition is a generation of its own that starts at the consumer's
  position (the committed offset): a record is tracked only if it is the next offset of the
  current generation, so a batch fetched before a rebalance, or a re-read, can never leave a
  hole the commit point would pass; a record that finishes for a generation that is gone
  changes nothing;
- a gap (the next offset is not the one expected) is not tracked at once: the caller seeks back
  to the expected offset. A batch fetched before a rebalance is handed over once, so the same
  gap seen again after seeking back is real (the log has no records there: compaction,
  transaction markers) and is accepted on the third sighting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

PartitionKey = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One tracked record: finishing it is what lets the commit point pass it."""

    partition: PartitionKey
    generation: int
    offset: int


class Untracked(Enum):
    STALE = "stale"  # the partition is not assigned to us (a batch from before a rebalance)
    SEEN = "seen"  # already tracked in this generation, or before its start
    GAP = "gap"  # not the next offset: seek back to `expected(partition)`


GAP_SIGHTINGS = 3


class _Partition:
    __slots__ = (
        "commit_at",
        "finished",
        "gap",
        "gap_seen",
        "generation",
        "next_offset",
        "pending",
    )

    def __init__(self, generation: int, position: int) -> None:
        self.generation = generation
        self.next_offset = position
        self.pending: deque[int] = deque()
        self.finished: set[int] = set()
        self.commit_at: int | None = None
        self.gap: tuple[int, int] | None = None  # (expected, seen) of the last gap reported
        self.gap_seen = 0


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[PartitionKey, _Partition] = {}
        self._advanced: set[PartitionKey] = set()
        self._generations = 0

    def assign(self, partition: PartitionKey, position: int) -> None:
        self._generations += 1
        self._partitions[partition] = _Partition(self._generations, position)
        self._advanced.discard(partition)

    def revoke(self, partitions: Iterable[PartitionKey]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._advanced.discard(partition)

    def partitions(self) -> list[PartitionKey]:
        return list(self._partitions)

    def assigned(self, partition: PartitionKey) -> bool:
        return partition in self._partitions

    def expected(self, partition: PartitionKey) -> int | None:
        state = self._partitions.get(partition)
        return state.next_offset if state else None

    def in_flight(self, topic: str | None = None) -> int:
        """Records tracked and not finished yet."""
        return sum(
            len(p.pending) - len(p.finished)
            for key, p in self._partitions.items()
            if topic is None or key[0] == topic
        )

    def held_back(self, topic: str | None = None) -> int:
        """Offsets kept in memory: unfinished ones and finished ones behind an unfinished one."""
        return sum(
            len(p.pending)
            for key, p in self._partitions.items()
            if topic is None or key[0] == topic
        )

    def track(self, partition: PartitionKey, offset: int) -> Ticket | Untracked:
        state = self._partitions.get(partition)
        if state is None:
            return Untracked.STALE
        if offset < state.next_offset:
            return Untracked.SEEN
        if offset > state.next_offset:
            if state.gap != (state.next_offset, offset):
                state.gap, state.gap_seen = (state.next_offset, offset), 0
            state.gap_seen += 1
            if state.gap_seen < GAP_SIGHTINGS:
                return Untracked.GAP
            # Seen again after seeking back: there are no records in between.
            if not state.pending:
                state.commit_at = offset
                self._advanced.add(partition)
        state.gap, state.gap_seen = None, 0
        state.pending.append(offset)
        state.next_offset = offset + 1
        return Ticket(partition, state.generation, offset)

    def finish(self, ticket: Ticket) -> None:
        state = self._partitions.get(ticket.partition)
        if state is None or state.generation != ticket.generation:
            return  # revoked meanwhile: its next owner reads it again
        state.finished.add(ticket.offset)
        while state.pending and state.pending[0] in state.finished:
            done = state.pending.popleft()
            state.finished.discard(done)
            state.commit_at = done + 1
            self._advanced.add(ticket.partition)

    def current(self, ticket: Ticket) -> bool:
        state = self._partitions.get(ticket.partition)
        return state is not None and state.generation == ticket.generation

    def committable(self) -> dict[PartitionKey, int]:
        """Partitions whose commit point moved since the last call, with the offset to commit."""
        ready = {
            p: state.commit_at
            for p in self._advanced
            if (state := self._partitions.get(p)) is not None and state.commit_at is not None
        }
        self._advanced.clear()
        return ready

    def commit_again(self, partitions: Iterable[PartitionKey]) -> None:
        """A commit of these partitions' points failed: the next `committable` offers them
        again (while they are still ours), even if nothing more finishes on them."""
        self._advanced.update(p for p in partitions if p in self._partitions)

    def commit_points(self) -> dict[PartitionKey, int]:
        """Every partition's commit point (on revocation and shutdown: commit all of it)."""
        return {p: s.commit_at for p, s in self._partitions.items() if s.commit_at is not None}
