"""Which worker consumes which partition: partition p of every lane goes to the same worker.

A contract's records keep their order across the lanes (CONTRACT §2: in order per contract,
whatever the lane), and a contract has the same partition number on both lanes (its key, the
producer's partitioner, the same partition count). When a contract's next record is on the
other lane, the worker that settles the one before it wakes that record's chain at once
(workers.pipeline) — if it holds both. The Kafka client's round-robin assignor does not see
that a worker's two lane consumers belong together: it gave partition p of both lanes to the
same worker in half of the groups it formed, and to different workers in the other half,
where each such step waits out a back-off instead.

Rules kept here:
- every partition of a topic some member subscribes to goes to exactly one member subscribed
  to it, and each topic's partitions are spread over the workers subscribed to it within one;
- a member says which worker it belongs to in its metadata; one that does not (another
  client) counts as a worker of its own;
- a group whose members do not all offer this assignor falls back to round-robin (the broker
  picks a protocol every member offers), and so does an assignment that fails here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import structlog
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

log = structlog.get_logger("etrm.worker")


class LaneAlignedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    name = "etrm-lane-aligned"
    version = 0
    # The worker this process's consumers belong to (set per process by `for_worker`).
    worker = ""

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), cls.worker.encode())

    @classmethod
    def assign(
        cls,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        try:
            partitions = {
                topic: sorted(cluster.partitions_for_topic(topic) or ())
                for member in members.values()
                for topic in member.subscription
            }
            plan = aligned(members, partitions)
            return {
                member: ConsumerProtocolMemberAssignment(cls.version, sorted(mine.items()), b"")
                for member, mine in plan.items()
            }
        except Exception:  # never leave the group without an assignment
            log.exception("lane_aligned_assignment_failed")
            fallback: dict[str, ConsumerProtocolMemberAssignment]
            fallback = RoundRobinPartitionAssignor.assign(cluster, members)
            return fallback

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


def aligned(
    members: Mapping[str, ConsumerProtocolMemberMetadata],
    partitions: Mapping[str, list[int]],
) -> dict[str, dict[str, list[int]]]:
    """Each member's partitions by topic: partition p of a topic goes to the (p mod n)-th of
    the n workers subscribed to it, in the order of their names — so the same worker for every
    topic those workers all subscribe to — and within that worker to its subscribed members in
    turn."""
    by_worker: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for member_id in sorted(members):
        metadata = members[member_id]
        worker = _worker_of(member_id, metadata.user_data)
        for topic in metadata.subscription:
            by_worker[worker][topic].append(member_id)
    assignment: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in members}
    for topic, numbers in partitions.items():
        workers = sorted(w for w, topics in by_worker.items() if topic in topics)
        for i, partition in enumerate(numbers):
            takers = by_worker[workers[partition % len(workers)]][topic]
            assignment[takers[(i // len(workers)) % len(takers)]][topic].append(partition)
    return {member_id: dict(topics) for member_id, topics in assignment.items()}


def _worker_of(member_id: str, user_data: bytes | None) -> str:
    try:
        worker = (user_data or b"").decode()
    except UnicodeDecodeError:
        worker = ""
    return f"w:{worker}" if worker else f"m:{member_id}"


def for_worker(worker: str) -> tuple[type[AbstractPartitionAssignor], ...]:
    """The assignors a worker's consumers offer, best first: lane-aligned, naming `worker`,
    then round-robin for a group with members that do not know it."""
    named = type("LaneAlignedAssignor", (LaneAlignedAssignor,), {"worker": worker})
    return (named, RoundRobinPartitionAssignor)
