"""Group commit: many chains ask, one statement answers them all.

Rules kept here:
- whatever is queued when the previous statement returns goes into the next one, so a busy
  worker writes large groups and an idle one answers at once;
- an infrastructure failure (database restarting, connection lost) retries the whole group
  after a pause, for as long as it takes: nothing queued is dropped;
- a group that fails for what it contains (a value the database refuses) is split in halves
  until the one bad item is alone; that item alone is failed, the rest go through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog
from asyncpg.exceptions import DataError as DriverDataError
from asyncpg.exceptions import IntegrityConstraintViolationError, SyntaxOrAccessError
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

from runtime.aio import stop_tasks

log = structlog.get_logger("etrm.worker")

T = TypeVar("T")
R = TypeVar("R")

# Errors that belong to the values sent, not to the database being away: SQLAlchemy's, and
# asyncpg's own for the statements run on it directly (ledger.db.fetch_direct).
CONTENT_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    IntegrityError,
    ProgrammingError,
    DriverDataError,
    IntegrityConstraintViolationError,
    SyntaxOrAccessError,
    ValueError,
    TypeError,
)


class BadItem(Exception):
    """The database refused this item for what it contains."""


class GroupCommitter(Generic[T, R]):
    def __init__(
        self,
        name: str,
        execute: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_group: int = 1000,
        retry_delay_s: float = 1.0,
        max_retry_delay_s: float = 5.0,
    ) -> None:
        self._name = name
        self._execute = execute
        self._max_group = max_group
        self._retry_delay = retry_delay_s
        self._max_retry_delay = max_retry_delay_s
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def submit(self, item: T) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"group-commit-{self._name}")
        return future

    async def __call__(self, item: T) -> R:
        return await self.submit(item)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def drained(self) -> None:
        """Returns once everything submitted so far has been written (or refused)."""
        await self._idle.wait()

    async def _run(self) -> None:
        delay = self._retry_delay
        while True:
            if not self._queue:
                self._idle.set()
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group = self._queue[: self._max_group]
                del self._queue[: len(group)]
                group = [(item, f) for item, f in group if not f.cancelled()]
                if not group:
                    continue
                try:
                    await self._split_and_apply(group)
                    delay = self._retry_delay
                except Exception as exc:  # the database is away: retry all of it
                    self.failures += 1
                    log.warning(
                        "group_commit_failed_will_retry",
                        what=self._name,
                        items=len(group),
                        error=type(exc).__name__,
                    )
                    self._queue[:0] = group
                    await asyncio.sleep(delay)
                    delay = min(self._max_retry_delay, delay * 2)

    async def _split_and_apply(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._execute([item for item, _ in group])
        except CONTENT_ERRORS as exc:
            if len(group) == 1:
                log.error(  # noqa: TRY400 - its values must not reach the log
                    "group_commit_item_refused", what=self._name, error=type(exc).__name__
                )
                _, future = group[0]
                if not future.done():
                    future.set_exception(BadItem(type(exc).__name__))
                return
            half = len(group) // 2
            await self._split_and_apply(group[:half])
            await self._split_and_apply(group[half:])
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
