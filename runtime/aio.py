"""Small asyncio helpers every process uses: wait for the first of several things, keep
trying a start-up step while its dependency is away, and stop background tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("etrm.startup")
T = TypeVar("T")


async def first_of(*waits: Awaitable[object]) -> None:
    """Return as soon as any of the awaitables is done; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stop_tasks(tasks)


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


# How often a task still running is cancelled again while `stop_tasks` waits for it, and how
# long it waits for background loops (each ends at its next await once cancelled).
RECANCEL_S = 0.5
STOP_S = 10.0


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout_s: float = STOP_S) -> list[str]:
    """Cancel `tasks` and wait, at most `timeout_s`, for every one to end — cancelling again,
    every RECANCEL_S, any that is still running. A task can swallow a cancellation: before
    Python 3.12, `asyncio.wait_for` returns its inner result, dropping the cancellation, when
    both arrive together (seen: a worker's committer, cancelled as it read its lag, went on
    committing every second and held the worker's stop until the test gave up). Returns the
    names of the tasks still running at the end (logged); their failures are not raised. A
    cancellation of the caller itself, while it waits, is not swallowed: it propagates."""
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure while stopping is not news
    stuck = sorted(task.get_name() for task in pending)
    if stuck:
        log.warning("tasks_not_stopped", tasks=stuck, waited_s=timeout_s)
    return stuck
