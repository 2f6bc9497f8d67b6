"""Putting records back on their lanes: operator replays of dead letters, and continuations of
parked records. Both run the same way, in chunks, resumable by any process that has the
signing key and a producer (the intake and the workers).

Rules kept here:
- requeue (ledger, under the job's own publication) before publish, mark after the broker's
  acknowledgement; a publish that fails is tried again (the job keeps its lease and stays
  `running`), a runner that dies is taken over once its lease expires — so a requeued record
  always gets its copy on the broker, and a copy published twice is the same publication
  (the ledger delivers it once);
- each copy carries the record's original identity headers, `replay_id` (the publication),
  and for replays of dead letters `replay_of` and `replay_count`, signed with the active key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import reconciliation as recon
from ledger.crypto import LaneSealer, PayloadCipher
from ledger.rows import Actor
from runtime.kafka import KafkaPublisher, OutgoingRecord, PublishFailed
from schemas.envelope import SCHEMA_VERSION, kafka_headers
from schemas.states import Publication

log = structlog.get_logger("etrm.ops")
CHUNK = 200
LEASE_S = 60.0
RETRY_DELAY_S = 1.0

Progress = Callable[[int, int], None]


class Republisher:
    def __init__(
        self,
        engine: AsyncEngine,
        publisher: KafkaPublisher,
        cipher: PayloadCipher,
        sealer: LaneSealer,
        *,
        chunk: int = CHUNK,
        lease_s: float = LEASE_S,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.cipher = cipher
        self.sealer = sealer
        self.chunk = chunk
        self.lease_s = lease_s

    def record_for(self, item: recon.OnLane, job_id: str, kind: str) -> OutgoingRecord:
        headers = {
            "message_id": item.message_id,
            "desk": item.desk,
            "trader": item.trader,
            "trace_id": item.trace_id,
            "schema_version": SCHEMA_VERSION,
        }
        if kind == Publication.INTAKE:  # the desk's request is the publication
            headers["batch_id"] = job_id
        else:
            headers["replay_id"] = job_id
            if item.batch_id:
                headers["batch_id"] = item.batch_id
        if kind == Publication.REPLAY and item.dead_letter_id:
            headers["replay_of"] = item.dead_letter_id
            headers["replay_count"] = str(item.replay_count)
        wire = self.sealer.seal(item.value, headers)
        return (item.topic, item.contract_id.encode(), wire, kafka_headers(headers))

    async def restore(self, stranded: list[recon.Stranded], actor: Actor, why: str) -> None:
        """Put queued records back on their lanes under the publication the ledger holds as
        live — the same copy again, so whichever copy a worker takes first is delivered and
        the other finds it settled — and audit each, saying `why`, once the broker
        acknowledged it."""
        records = [self.record_for(r, r.publication, r.kind) for r in stranded]
        await self.publisher.send_all(records, what="restore queued records")
        await recon.record_restored(self.engine, stranded, actor, why)

    async def run(
        self,
        job_id: str,
        actor: Actor,
        progress: Progress | None = None,
        *,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Publish what is still pending of a replay or continuation; False when it is not
        runnable now (awaiting approval, done, or another runner holds it)."""
        if not await recon.take_replay(self.engine, job_id, self.lease_s):
            return False
        job = await recon.get_replay(self.engine, job_id)
        assert job is not None
        kind = Publication(job["kind"])
        total, done = job["item_count"], job["progress"]["published"]
        while stop is None or not stop.is_set():
            items = await recon.requeue_chunk(
                self.engine, job_id, kind, self.chunk, self.cipher, actor
            )
            if not items:
                await recon.finish_replay(self.engine, job_id, actor)
                log.info("republish_completed", job_id=job_id, kind=str(kind), published=done)
                return True
            records = [self.record_for(i, job_id, kind) for i in items]
            while True:
                try:
                    await self.publisher.send_all(records, what=f"{kind} {job_id}")
                    break
                except PublishFailed:
                    # The records are queued under this publication: they must reach the
                    # broker. Keep the lease and try again.
                    await recon.renew_replay(self.engine, job_id, self.lease_s)
                    await asyncio.sleep(RETRY_DELAY_S)
            await self.mark(job_id, items, actor)
            done += len(items)
            if progress:
                progress(done, total)
        return False

    async def mark(self, job_id: str, items: list[recon.Republish], actor: Actor) -> None:
        """The chunk is on the broker: record it (a crash before this republishes the chunk:
        the same publication, delivered once)."""
        await recon.mark_republished(self.engine, job_id, items, actor, self.lease_s)

    async def run_runnable(self, actor: Actor, stop: asyncio.Event | None = None) -> int:
        ran = 0
        for job_id in await recon.runnable_replays(self.engine):
            if await self.run(job_id, actor, stop=stop):
                ran += 1
        return ran
