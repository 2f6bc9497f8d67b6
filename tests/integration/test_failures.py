"""Process and broker failures: nothing accepted is lost or sent twice."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict

import pytest
from sqlalchemy import text

from ledger.db import make_engine
from runtime.kafka import ensure_topics
from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import never

pytestmark = pytest.mark.integration


async def test_worker_killed_mid_run_delivers_everything_once_in_order(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        worker=False, sim={"latency_ms": 15}, worker_concurrency=16
    )
    client = pipe.client()
    run = samples.run_id()
    records = samples.mixed_batch(run, 2000, contracts=100, prefix="KILL")
    response = await submit_batch(client, run, records)
    assert response.status_code == 202, response.text
    submitted = response.json()["messages"]
    order = {m["message_id"]: m["index"] for m in submitted}

    worker = pipe.spawn_worker()
    try:
        deadline = time.monotonic() + 60
        while len(pipe.sim.effects) < 400:
            assert time.monotonic() < deadline, "worker never got going"
            assert worker.poll() is None, "worker exited on its own"
            await asyncio.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = len(pipe.sim.effects)
        assert killed_at < 2000, "the run finished before the kill; make it slower"
        worker = pipe.spawn_worker()
        batch = await pipe.wait_final(client, response.json()["batch_id"], timeout=180)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

    # Records whose 201 was lost with the worker are answered 200 "already have it" on the
    # second pass: delivered (CONTRACT §4), taken once, never sent a third time; with no
    # reconciled position in that answer, each one's history says the drift check did not run.
    assert batch["counts"] == {"delivered": 2000}
    duplicates = sorted(k for k, n in pipe.sim.posts_by_key.items() if n > 1)
    assert all(pipe.sim.posts_by_key[k] == 2 for k in duplicates)
    for key in duplicates[:5]:
        history = (await client.get(f"/v1/settlements/{key}")).json()["history"]
        assert "drift not checked" in history[-1]["detail"], history
    keys = [e.idempotency_key for e in pipe.sim.effects]
    assert len(keys) == 2000
    assert len(set(keys)) == 2000, "a record took effect twice"
    per_contract: dict[str, list[int]] = defaultdict(list)
    for effect in pipe.sim.effects:
        per_contract[effect.contract_id].append(order[effect.idempotency_key])
    for contract, indices in per_contract.items():
        assert indices == sorted(indices), f"{contract} delivered out of order"


async def test_broker_down_answers_503_and_same_key_succeeds_later(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(worker=False)
    client = pipe.client()
    run = samples.run_id()
    records = [samples.otc_confirmation(run, "OTC-BROKER-01")]
    pipe.infra.broker.stop()
    try:
        refused = await submit_batch(client, run, records, key="outage-key")
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        engine = make_engine(pipe.settings.database_url)
        async with engine.connect() as conn:
            batches = await conn.scalar(
                text(
                    "SELECT count(*) FROM batches WHERE idempotency_key = 'outage-key' "
                    "AND state <> 'aborted'"
                )
            )
            keys = await conn.scalar(
                text("SELECT count(*) FROM idempotency_keys WHERE key = 'outage-key'")
            )
        await engine.dispose()
        assert (batches, keys) == (0, 0), "a refused request was recorded as accepted"
    finally:
        pipe.infra.broker.start()
        await ensure_topics(
            pipe.settings.kafka_bootstrap_servers,
            pipe.settings.all_topics,
            pipe.settings.kafka_partitions,
        )

    deadline = time.monotonic() + 60
    while True:
        accepted = await submit_batch(client, run, records, key="outage-key")
        if accepted.status_code == 202 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert accepted.status_code == 202, accepted.text
    await pipe.start_worker()
    batch = await pipe.wait_final(client, accepted.json()["batch_id"])
    assert batch["counts"] == {"delivered": 1}
    await never(lambda: len(pipe.sim.effects) > 1, 1.0)
