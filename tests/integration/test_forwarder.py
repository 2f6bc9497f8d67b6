"""The worker's commit rule, driven directly (real Postgres, real simulator, no broker): an
offset becomes committable only when its record and every earlier one on the partition has a
final state written — also when a later copy of the same message arrives meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from ingest.publisher import SettlementPublisher
from ledger.crypto import PayloadCipher
from ledger.db import make_engine
from ops import samples
from runtime.bootstrap import upstream_client, upstream_http
from schemas.envelope import envelope_for, validate_record
from tests.conftest import Pipeline, PipelineFactory
from workers.delivery import Forwarder

pytestmark = pytest.mark.integration
TOPIC = "forwarder.standard"


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


def signed_record(pipe: Pipeline, raw: dict[str, object], offset: int) -> Record:
    record = validate_record(raw, 0)
    assert not isinstance(record, list)
    envelope = envelope_for("power-east", record)
    headers = SettlementPublisher(pipe.settings).headers_for(
        envelope, desk="power-east", trader="t", trace_id="trace", batch_id="b"
    )
    return Record(TOPIC, 0, offset, envelope.contract_id.encode(), envelope.value, headers)


async def test_commit_point_waits_for_written_outcomes_and_duplicate_copies(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(worker=False, sim={"latency_ms": 400})
    engine = make_engine(pipe.settings.database_url or "")
    http = upstream_http(pipe.settings)
    dead_letters: list[bytes] = []

    async def publish_dead_letter(
        key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        dead_letters.append(value)

    forwarder = Forwarder(
        engine=engine,
        upstream=upstream_client(pipe.settings, http),
        publish_dead_letter=publish_dead_letter,
        signing_keys=dict(pipe.settings.signing_keys()),
        concurrency=8,
        drift_threshold=pipe.settings.drift_threshold,
        cipher=PayloadCipher(pipe.settings.encryption_keyring()),
    )
    forwarder.writer.start()
    try:
        run = samples.run_id()
        slow = signed_record(pipe, samples.otc_confirmation(run, "OTC-FWD-0001"), 0)
        other = signed_record(pipe, samples.otc_confirmation(run, "OTC-FWD-0002"), 1)
        await forwarder.process([slow, other])
        # A rebalance takes the partition away and hands it back: the same records are read
        # again while the first copies are still in flight (the upstream takes 400 ms).
        forwarder.offsets.forget([(TOPIC, 0)])
        await forwarder.process([slow, other])
        assert forwarder.offsets.committable() == {}, "copies must wait for the originals"
        reached = 0
        for _ in range(100):
            reached = forwarder.offsets.committable().get((TOPIC, 0), reached)
            if reached == 2:
                break
            await asyncio.sleep(0.05)
        assert reached == 2  # committable once the first copies' outcomes are written
        assert len(pipe.sim.effects) == 2
        assert pipe.sim.duplicate_posts == 0
        assert dead_letters == []
    finally:
        await forwarder.writer.stop()
        await http.aclose()
        await engine.dispose()
