"""CPU-heavy request work (parsing and validating a large batch, serializing and signing its
records) off the event loop: one process-wide pool sized to the cores, so a desk's 5,000-record
batch cannot hold the loop — and with it every other desk's request — for a second.

Small work stays inline: a thread hop costs more than validating a record or two.
pydantic-core and the json module hold the GIL, so a thread does not add a core; what it buys is
the interpreter's switch interval: the loop gets the GIL back every few milliseconds and keeps
answering the other desks while a big batch is worked through.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="etrm-cpu")
# While a pool thread holds the GIL, the loop waits up to the switch interval (5 ms by default)
# each time it wants it back, and a request needs it back at every await: measured, another
# desk's read went from 11 ms to ~250 ms at p50 while one desk's big batches were validated.
# 0.5 ms brings that to ~37 ms, for a small throughput cost only while a pool thread runs.
SWITCH_INTERVAL_S = 0.0005
# Above this many records a request's per-record work runs in the pool.
HEAVY_RECORDS = 64


async def off_loop(heavy: bool, work: Callable[[], T]) -> T:
    """`work()` in the pool when `heavy`, else right here."""
    if not heavy:
        return work()
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    return await asyncio.get_running_loop().run_in_executor(_POOL, work)


def settle_heap() -> None:
    """Once a process has started: move what it built so far out of the collector's sight
    (gc.freeze) and collect young objects less often. A 5,000-record batch allocates hundreds
    of thousands of objects; with the default thresholds the collector walked the whole heap
    several times per batch, on the event loop — measured, another desk's read p99 under big
    batches went from ~500-650 ms to ~200 ms with this (and ~210 ms with the collector off)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
