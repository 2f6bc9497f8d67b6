"""A desk's batch read stays a lookup by key whatever the planner's statistics say: while one
desk sends 5,000-record batches, the rows a batch id matches are estimated at ~1,000 for every
batch, and for that many the planner used to scan all of `messages` into a hash join, even
to read another desk's one-record batch (5-28 ms in the executor against 0.03 ms)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.db import fetch_direct, make_engine
from ledger.reads import BATCH_READ, get_batch
from tests.conftest import Infra, fresh_database

BATCHES, RECORDS = 120, 900  # equal sizes: no batch id stands out in the statistics


# A batch: its row, its records and its list, as the acceptance leaves them.
_BATCH = (
    "INSERT INTO batches (batch_id, desk, trader, settlement_run_id, idempotency_key,"
    " record_count, trace_id, state) VALUES (:b, :desk, 't', 'run', :b, :n, 'trace', 'accepted')",
    "INSERT INTO messages (message_id, desk, trader, batch_id, settlement_run_id, contract_id,"
    " market, identity_hash, revision, topic, state, publication, accept_seq,"
    " submitted_position_mwh, payload, payload_kid, trace_id)"
    " SELECT :b || '-' || g, :desk, 't', :b, 'run', 'C-' || (g % 50), 'ISO', md5(:b || g), 1,"
    " 'lane', 'queued', :b, g, 1.0, '\\x00'::bytea, 'k', 'trace' FROM generate_series(1, :n) g",
    "INSERT INTO batch_messages (batch_id, idx, message_id)"
    " SELECT :b, g - 1, :b || '-' || g FROM generate_series(1, :n) g",
)


async def _add_batch(conn: Any, desk: str, size: int) -> str:
    batch = f"batch_{uuid.uuid4().hex}"
    for statement in _BATCH:
        await conn.execute(text(statement), {"b": batch, "desk": desk, "n": size})
    return batch


async def test_a_batch_read_looks_its_records_up_by_key_whatever_the_statistics(
    infra: Infra,
) -> None:
    url = await fresh_database(infra)
    setup = create_async_engine(url, isolation_level="AUTOCOMMIT")
    reads = make_engine(url, 1, custom_plans=True)  # as the intake's reads are planned
    try:
        async with setup.connect() as conn:
            busy = [await _add_batch(conn, "busy-desk", RECORDS) for _ in range(BATCHES)]
            small = await _add_batch(conn, "other-desk", 1)
            await conn.execute(text("ANALYZE"))
        for batch in (small, busy[0]):
            explained = await fetch_direct(
                reads, f"EXPLAIN {BATCH_READ}", {"id": batch, "desk": None}
            )
            plan = "\n".join(row[0] for row in explained)
            assert "Seq Scan on messages" not in plan, plan  # parallel ones included
            assert "Seq Scan on batch_messages" not in plan, plan

        one = await get_batch(reads, small, "other-desk")
        assert one is not None
        assert [(r.index, r.message_id) for r in one.records] == [(0, f"{small}-1")]
        assert await get_batch(reads, small, "busy-desk") is None  # not yours: as if absent
        many = await get_batch(reads, busy[0], None)
        assert many is not None
        assert [r.index for r in many.records] == list(range(RECORDS))
        assert [r.message_id for r in many.records] == [
            f"{busy[0]}-{i}" for i in range(1, RECORDS + 1)
        ]
    finally:
        await setup.dispose()
        await reads.dispose()
