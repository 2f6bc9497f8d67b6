"""A worker never stalls on records it has not read yet (workers.app.widen_if_stalled).

Two requests accepted at once can reach the broker in the other order: the later-accepted
request's records first on the partition, the earlier one's behind them. The later copies then
wait for the earlier records of their contracts, and once they fill the lane's limit the lane
pauses — with the records they wait for still unread behind them. Found as a 100,000-record
settlement run from 4 clients that stopped at 46,488 delivered, both lanes of both workers
paused for good. Played here on real Tansu and Postgres with a lane limit of 8: the earlier
request's records are published after 40 of the later one's."""

from __future__ import annotations

from collections import defaultdict

import pytest

from ingest.publisher import SettlementPublisher
from ledger import acceptance
from ledger.crypto import PayloadCipher
from ledger.db import make_engine
from ledger.rows import Actor
from ops.bootstrap import lane_sealer
from ops.dev.bench import direct_request
from runtime.kafka import KafkaPublisher
from schemas import samples
from schemas.envelope import Envelope, envelope_for, validate_record
from tests.conftest import PipelineFactory
from tests.support import wait_for

pytestmark = pytest.mark.integration

CONTRACTS = [f"ORDER-{n:04d}" for n in range(4)]


def _envelopes(run: str, hours: range) -> list[Envelope]:
    made = []
    for hour in hours:
        for contract in CONTRACTS:
            record = validate_record(
                samples.canonical(run, contract, market="iso_day_ahead", hour=hour), 0
            )
            assert not isinstance(record, list), record
            made.append(envelope_for("power-east", record))
    return made


async def test_copies_waiting_for_unread_earlier_records_do_not_stall_their_lane(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe = await pipeline_factory(worker=False, worker_max_records=2)  # a lane limit of 8
    settings = pipe.settings
    run = "ORDERRUN00000001"
    earlier = _envelopes(run, range(1))  # one record a contract, accepted first
    later = _envelopes(run, range(1, 11))  # ten a contract, accepted second
    kafka = KafkaPublisher(settings)
    engine = make_engine(settings.database_url, 2)
    cipher = PayloadCipher(settings.encryption_keyring())
    publisher = SettlementPublisher(kafka, settings.lanes, lane_sealer(settings, cipher))
    try:
        requests = []
        for envelopes in (earlier, later):  # accepted in this order …
            request = direct_request(
                envelopes, publisher, desk="power-east", trader="t1", run_id=run
            )
            assert isinstance(await acceptance.begin(engine, request, cipher), acceptance.Pending)
            requests.append((request, envelopes))
        for request, envelopes in reversed(requests):  # … published in the other
            await publisher.publish(
                envelopes,
                desk="power-east",
                trader="t1",
                trace_id=request.trace_id,
                batch_id=request.batch_id,
            )
        for request, envelopes in requests:
            assert await acceptance.complete(
                engine, request, Actor("system", "test"), len(envelopes)
            )
    finally:
        await kafka.stop()
        await engine.dispose()

    await pipe.start_worker()
    total = len(earlier) + len(later)

    async def all_delivered() -> bool:
        return len(pipe.sim.effects) >= total

    await wait_for(all_delivered, timeout=90)
    await pipe.stop_worker()
    assert len(pipe.sim.effects) == total
    assert set(pipe.sim.posts_by_key.values()) == {1}
    # each contract's records took effect in acceptance order: the earlier request's first
    order: dict[str, list[str]] = defaultdict(list)
    for effect in pipe.sim.effects:
        order[effect.contract_id].append(effect.idempotency_key)
    first = {e.contract_id: e.message_id for e in earlier}
    for contract in CONTRACTS:
        assert order[contract][0] == first[contract], contract
        assert order[contract][1:] == [e.message_id for e in later if e.contract_id == contract]
