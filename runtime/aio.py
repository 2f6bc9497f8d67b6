"""Small asyncio helpers every process uses: wait for the first of several things, and keep
trying a start-up step while its dependency is away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

log = structlog.get_logger("etrm.startup")
T = TypeVar("T")


async def first_of(*waits: Awaitable[object]) -> None:
    """Return as soon as any of the awaitables is done; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def until_up(
    what: str,
    step: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[BaseException], bool],
    max_delay_s: float = 5.0,
) -> T:
    """Run a start-up step until it succeeds while its failure is `transient` (the broker or
    the database not answering yet): a process started during an outage waits it out instead
    of exiting. Any other failure (a schema behind, bad settings) is raised at once."""
    delay, tries = 0.5, 0
    while True:
        try:
            return await step()
        except Exception as exc:
            if not transient(exc):
                raise
            tries += 1
            if tries == 1 or tries % 10 == 0:
                log.warning("waiting_for_dependency", what=what, error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(max_delay_s, delay * 2)
