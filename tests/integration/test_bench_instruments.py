"""The bench's own instruments, on real Postgres: a figure of 0 must mean nothing was seen,
not that the instrument cannot see."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from ledger.db import make_engine
from ops.dev.bench import lock_wait_seconds
from tests.conftest import Infra, fresh_database
from tests.support import wait_for

pytestmark = pytest.mark.integration

LOCK = 4_242_424


async def test_lock_wait_counts_a_session_held_behind_a_lock(infra: Infra) -> None:
    url = await fresh_database(infra)
    engine = make_engine(url, 3)
    stop = asyncio.Event()
    sampler = asyncio.create_task(lock_wait_seconds(url, stop))
    try:
        async with engine.connect() as holder, engine.connect() as waiter, engine.connect() as look:
            await holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK})
            blocked = asyncio.create_task(
                waiter.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK})
            )

            # each look a transaction of its own: one reads pg_stat_activity from one snapshot
            await look.execution_options(isolation_level="AUTOCOMMIT")

            async def waiting() -> bool:
                count = await look.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                )
                return bool(count)

            await wait_for(waiting)
            held_from = time.perf_counter()
            await asyncio.sleep(0.8)
            await holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK})
            await asyncio.wait_for(blocked, 10)
            held = time.perf_counter() - held_from
            await waiter.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK})
        await asyncio.sleep(0.1)  # a few samples with nobody waiting
    finally:
        stop.set()
        waited = await asyncio.wait_for(sampler, 10)
        await engine.dispose()
    # the wait the sampler saw: the stretch timed here, less at most the gap before the sample
    # that found it over (half a second of slack for a loaded machine), never much more
    assert 0.3 <= waited <= held + 1.0, (waited, held)


async def test_lock_wait_is_zero_when_nobody_waits(infra: Infra) -> None:
    url = await fresh_database(infra)
    stop = asyncio.Event()
    sampler = asyncio.create_task(lock_wait_seconds(url, stop))
    await asyncio.sleep(0.3)
    stop.set()
    assert await asyncio.wait_for(sampler, 10) == 0.0
