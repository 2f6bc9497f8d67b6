"""The loops every intake and worker runs beside its main job, so that nothing depends on one
particular process being alive:

- the audit sequencer (one at a time, whoever takes the turn) and signed checkpoints;
- aborting acceptances pending past their lease (their intake never answered 202);
- the dead-letter outbox;
- replays and continuations that are approved, or whose runner died;
- parked records whose contract has nothing open any more;
- idempotency keys past their retention (ETRM_IDEMPOTENCY_RETENTION_H);
- in workers, queued records whose copy is no longer on the broker (a broker that lost its
  log: Tansu's memory storage after a restart, or an unclean leader election), published again.

Each loop survives any error (a database or broker outage is waited out, logged once a round).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import acceptance, audit
from ledger import reconciliation as recon
from ledger.crypto import PayloadCipher
from ledger.rows import Actor
from operations.outbox import publish_dead_letters
from operations.publishing import Republisher
from runtime.aio import first_of, stop_tasks
from runtime.kafka import KafkaPublisher, LaneLog

log = structlog.get_logger("etrm.housekeeping")


@dataclass(frozen=True, slots=True)
class Intervals:
    sequencer_s: float = 0.5
    sweeper_s: float = 2.0
    outbox_s: float = 1.0
    republisher_s: float = 2.0
    continuation_s: float = 2.0
    checkpoint_s: float = 300.0
    key_expiry_s: float = 60.0
    restore_s: float = 5.0
    # A record queued this long ago and still queued while the workers' group has settled
    # everything the broker holds of the lanes is not on the broker any more.
    restore_after_s: float = 10.0
    # While the lanes are unsettled: a record waited for restore_after_s by a later record of
    # its contract on its own lane, or on a lane that has settled, is not on the broker; on a
    # lane still busy it may just be behind a backlog, and is published again only after this.
    restore_waited_across_s: float = 60.0
    # A contract whose later records wait for its queued ones is restored at most this often
    # while the lanes are unsettled.
    restore_waited_again_s: float = 60.0


RESTORE_CHUNK = 500


class Housekeeping:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        cipher: PayloadCipher,
        publisher: KafkaPublisher,
        republisher: Republisher,
        reconciliation_topic: str,
        actor: Actor,
        audit_signer: Ed25519PrivateKey | None = None,
        intervals: Intervals | None = None,
        key_retention_s: float = 24 * 3600.0,
        checkpoint_dir: Path | None = None,
        lanes: LaneLog | None = None,
        published_again: Callable[[int], object] | None = None,
        waiting: Callable[[float], Mapping[tuple[str, str, str], Collection[str]]] | None = None,
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.publisher = publisher
        self.republisher = republisher
        self.topic = reconciliation_topic
        self.actor = actor
        self.signer = audit_signer
        self.every = intervals or Intervals()
        self.key_retention_s = key_retention_s
        self.checkpoint_dir = checkpoint_dir
        self.lanes = lanes
        self.published_again = published_again
        # (desk, contract, lane topic) of copies here that waited, longer than given, for an
        # earlier record this process does not hold, with the records of the contract held
        # here (the worker's pipeline); and when each contract was last restored for that
        self.waiting = waiting
        self.restored_waited: dict[tuple[str, str], float] = {}
        self.stop_event = asyncio.Event()
        self.outbox_nudge = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loops: list[tuple[str, float, Callable[[], Awaitable[object]], asyncio.Event | None]] = [
            ("audit_sequencer", self.every.sequencer_s, self.sequence, None),
            ("acceptance_sweeper", self.every.sweeper_s, self.sweep, None),
            ("dead_letter_outbox", self.every.outbox_s, self.outbox, self.outbox_nudge),
            ("republisher", self.every.republisher_s, self.republish, None),
            ("continuations", self.every.continuation_s, self.continuations, None),
            ("idempotency_key_expiry", self.every.key_expiry_s, self.forget_keys, None),
        ]
        if self.lanes is not None:
            loops.append(("restore_queued", self.every.restore_s, self.restore, None))
        if self.signer is not None:
            loops.append(("audit_checkpoints", self.every.checkpoint_s, self.checkpoint, None))
        self.tasks = [
            asyncio.create_task(self._loop(name, every, work, nudge), name=name)
            for name, every, work, nudge in loops
        ]

    async def stop(self) -> None:
        self.stop_event.set()
        await stop_tasks(self.tasks)
        if self.lanes is not None:
            await self.lanes.close()

    async def _loop(
        self,
        name: str,
        every: float,
        work: Callable[[], Awaitable[object]],
        nudge: asyncio.Event | None,
    ) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                await work()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("housekeeping_failed", loop=name, error=type(exc).__name__)
            wait = every if failures == 0 else min(every * (1 + failures), 10.0)
            waits = [self.stop_event.wait()] + ([nudge.wait()] if nudge else [])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await first_of(*waits)
            if nudge is not None:
                nudge.clear()

    async def sequence(self) -> None:
        await audit.sequence_all(self.engine)

    async def checkpoint(self) -> None:
        assert self.signer is not None
        seq = await audit.write_checkpoint(self.engine, self.signer, self.checkpoint_dir)
        log.info("audit_checkpoint", seq=seq)

    async def forget_keys(self) -> None:
        while (forgotten := await acceptance.forget_keys(self.engine, self.key_retention_s)) > 0:
            log.info("idempotency_keys_forgotten", keys=forgotten)

    async def sweep(self) -> None:
        aborted = await acceptance.sweep_expired(self.engine)
        if aborted:
            log.warning("acceptances_aborted_past_lease", batches=aborted)

    async def outbox(self) -> None:
        while await publish_dead_letters(self.engine, self.cipher, self.publisher, self.topic):
            pass

    async def republish(self) -> None:
        await self.republisher.run_runnable(self.actor, stop=self.stop_event)

    async def continuations(self) -> None:
        job_id = f"replay_cont_{uuid.uuid4().hex}"
        if await recon.continue_parked(self.engine, job_id, self.actor):
            await self.republisher.run(job_id, self.actor, stop=self.stop_event)

    async def restore(self) -> None:
        """Queued records whose copy the broker no longer holds, published again. A record
        queued before `cutoff` had its copy acknowledged before the lanes' ends are read; when
        the group has committed past every record the lanes hold, that copy was settled if it
        was there — so a record still queued is not there (the log was lost, or the group
        committed past where a new log restarted). Publishing it again is safe: the same
        publication, delivered once by the ledger."""
        assert self.lanes is not None
        cutoff = await recon.ledger_now(self.engine) - timedelta(seconds=self.every.restore_after_s)
        async with asyncio.timeout(30.0):
            unsettled = await self.lanes.unsettled()
        waited: recon.Waited | None = None
        why = "queued, and not on its lane: published again"
        if any(unsettled.values()):
            # Unsettled may mean stuck: later records of a contract wait for its lost ones,
            # and are never committed past while they wait.
            waited = self._waited_for(unsettled)
            if waited is None:
                return
            why = "queued, and waited for by later records of its contract: published again"
        stranded = await recon.queued_before(
            self.engine, cutoff, RESTORE_CHUNK, self.cipher, waited
        )
        if stranded:
            await self.republisher.restore(stranded, self.actor, why)
            log.warning(
                "queued_records_published_again",
                records=len(stranded),
                waited_for=waited is not None,
            )
            if self.published_again is not None:
                self.published_again(len(stranded))
            if waited is not None:
                self._restored({(r.desk, r.contract_id) for r in stranded})

    def _waited_for(self, unsettled: Mapping[str, int]) -> recon.Waited | None:
        """What the worker's copies have waited for long enough, by lane (`unsettled`: each
        lane's records the group has not committed past): on the copy's own lane or on one
        that has settled after `restore_after_s`, on any lane after `restore_waited_across_s`;
        of contracts not restored for that in the last `restore_waited_again_s`. None when
        nothing."""
        if self.waiting is None:
            return None
        now = time.monotonic()
        again = self.every.restore_waited_again_s
        for done, at in list(self.restored_waited.items()):
            if now - at >= again:
                del self.restored_waited[done]
        settled = [topic for topic, count in unsettled.items() if not count]
        waited = recon.Waited()
        for longer_than_s, across in (
            (self.every.restore_after_s, settled),
            (self.every.restore_waited_across_s, list(unsettled)),
        ):
            for (desk, contract, topic), held in self.waiting(longer_than_s).items():
                if (desk, contract) not in self.restored_waited:
                    waited.lanes.update((desk, contract, t) for t in {topic, *across})
                    waited.held.update(held)
        return waited if waited.lanes else None

    def _restored(self, contracts: Collection[tuple[str, str]]) -> None:
        """These contracts' waited-for records are on the broker again."""
        self.restored_waited.update(dict.fromkeys(contracts, time.monotonic()))
