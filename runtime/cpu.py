"""CPU-heavy request work (parsing and validating a large batch, serializing and signing its
records) off the event loop: one process-wide pool sized to the cores, so a desk's 5,000-record
batch cannot hold the loop — and with it every other desk's request — for a second.

Small work stays inline: a thread hop costs more than validating a record or two.
pydantic-core and the json module hold the GIL, so a thread does not add a core; what it buys is
the interpreter's switch interval: the loop gets the GIL back every few milliseconds and keeps
answering the other desks while a big batch is worked through.

The biggest piece — parsing and validating a big body — goes further, to worker processes
(`in_process`): they hold no GIL of the loop's, and they run niced, so on a busy machine the
scheduler serves the loop (every other desk's request) before one desk's big batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar, overload

import structlog

T = TypeVar("T")
log = structlog.get_logger("etrm.cpu")

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
    _share_gil_often()
    return await asyncio.get_running_loop().run_in_executor(_POOL, work)


def _share_gil_often() -> None:
    """A thread of ours is about to hold the GIL for a while: the loop gets it back every
    SWITCH_INTERVAL_S rather than every 5 ms."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_heap() -> None:
    """Once a process has started: move what it built so far (modules, settings, pools — kept
    for the process's life) out of the collector's sight (gc.freeze), so that a full collection
    walks only what was made since."""
    gc.collect()
    gc.freeze()


def settle_heap() -> None:
    """`freeze_heap`, and collect young objects less often (the intake). A 5,000-record batch
    allocates hundreds of thousands of objects; with the default thresholds the collector
    walked the whole heap several times per batch, on the event loop — measured, another desk's
    read p99 under big batches went from ~500-650 ms to ~200 ms with this (and ~210 ms with the
    collector off). And the big buffers of a big request reuse memory (`retain_freed_memory`)."""
    freeze_heap()
    gc.set_threshold(50_000, 50, 100)
    retain_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap, not a mapping of their own (glibc's own dynamic
# threshold stops at this size on 64-bit).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free memory at the top of the heap kept for the next request rather than given back.
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


def retain_freed_memory() -> bool:
    """Keep memory that big buffers freed, for the next ones (glibc; elsewhere nothing).

    A big request's buffers — its 2.5 MB body, the statement that records it, the produce
    request that publishes it — are megabytes each. glibc gave each one fresh pages (a mapping
    of its own, or heap it had just trimmed) and returned them when freed, so every request
    touched every page anew: a page fault per 4 KiB, on the event loop. Measured, asyncpg
    sending one 3 MB parameter: 4.3 ms of CPU per statement, 1.1 ms with this; most of it in
    the kernel faulting in the buffer asyncpg copies the value into. The cost is memory: up to
    TRIM_THRESHOLD_BYTES of freed heap stays with the process. Only the intake's processes:
    a delivering worker (small buffers, many of them) measured slower with it, 1.18-1.21 x its
    bare loop's CPU per delivery against 0.95-1.11. Returns whether it applied."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no C library to ask): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        )
    )


# -- worker processes ---------------------------------------------------------------------------

# How much lower the worker processes run than the process that serves requests. SCHED_IDLE
# was measured instead (README, performance): another desk's p99 no better, and it lets a busy
# machine starve a desk's acceptance outright.
NICENESS = 10


class _Processes:
    """The process-wide pool of worker processes, started on first use."""

    def __init__(self) -> None:
        self.count = 0
        self.preload: tuple[str, ...] = ()  # modules each process imports as it starts
        self.pool: ProcessPoolExecutor | None = None
        self.busy = 0  # pieces of work handed to the pool and not yet back

    def get(self) -> ProcessPoolExecutor | None:
        if self.count <= 0:
            return None
        if self.pool is None:
            # spawn, never fork: the serving process has threads (the thread pool, the producer's)
            self.pool = ProcessPoolExecutor(
                max_workers=self.count,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_started,
                initargs=(os.getpid(), self.preload),
            )
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


_PROCESSES = _Processes()


def use_processes(count: int, preload: Sequence[str] = ()) -> None:
    """How many worker processes `in_process` uses (0: the thread pool instead), and the
    modules each imports as it starts (`preload`: the code its work runs), so that the first
    piece of work a process is given does not wait for them — measured, a fresh intake's first
    1,000-record batch took 388 ms against 70-96 ms for the next five, most of it its worker
    processes importing the code that prepares a batch."""
    if count != _PROCESSES.count or tuple(preload) != _PROCESSES.preload:
        _PROCESSES.shutdown()
    _PROCESSES.count = count
    _PROCESSES.preload = tuple(preload)


def spare_processes() -> int:
    """How many worker processes have nothing to do right now (0 without worker processes)."""
    return max(0, _PROCESSES.count - _PROCESSES.busy)


def process_ids() -> list[int]:
    """The worker processes' pids (none until started)."""
    pool = _PROCESSES.pool
    processes = getattr(pool, "_processes", None) or {}
    return [pid for pid, process in processes.items() if process.is_alive()]


def warm_processes() -> None:
    """Start the worker processes now (each imports the code a batch needs, `use_processes`'
    preload, ~1 s of CPU), so the first big batch does not wait for them."""
    pool = _PROCESSES.get()
    if pool is not None:
        for _ in range(_PROCESSES.count):
            pool.submit(_ready)


async def in_process(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker process (`work`, its arguments, its result and any exception
    it raises must pickle). Without worker processes, or when one died under the request
    (killed, out of memory), the work is done in the thread pool instead: the request is
    answered either way."""
    pool = _PROCESSES.get()
    if pool is not None:
        _share_gil_often()  # the pool's own thread reads each result back, holding the GIL
        _PROCESSES.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, work, *args)
        except BrokenProcessPool:
            log.warning("cpu_process_lost")
            _PROCESSES.shutdown()
        finally:
            _PROCESSES.busy -= 1
    return await off_loop(True, functools.partial(work, *args))


class _Lazy(Sequence[T]):
    """A list whose items are made only where one is read (`_make`); its length is known
    without them."""

    __slots__ = ("_items", "_length")

    _items: list[T] | None
    _length: int

    def _make(self) -> list[T]:
        raise NotImplementedError

    def _opened(self) -> list[T]:
        if self._items is None:
            self._items = self._make()
        return self._items

    @property
    def opened(self) -> bool:
        """Its items were made in this process."""
        return self._items is not None

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        return self._opened()[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._opened())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Lazy | list):
            return NotImplemented
        return self._length == len(other) and self._opened() == list(other)

    __hash__ = None  # type: ignore[assignment]


class Packed(_Lazy[T]):
    """A list that comes back from a worker process as one pickled blob, opened only where an
    item is read. The pool's thread unpickles each result in the serving process, holding its
    GIL: for a 5,000-record batch, 10 ms of it went to building its records and envelopes
    (0.3 ms packed), and the event loop later freed them, 5,000 objects at a time. Where only
    their number is read — a batch whose records are all new — they are never opened. A list
    made from another (`derived`) crosses as the recipe, not again."""

    __slots__ = ("_blob", "_recipe")

    def __init__(self, items: Sequence[T]) -> None:
        self._items = list(items)
        self._blob = b""
        self._length = len(items)
        self._recipe: tuple[Callable[..., list[T]], tuple[Any, ...]] | None = None

    @classmethod
    def derived(cls, items: Sequence[T], make: Callable[..., list[T]], *args: Any) -> Packed[T]:
        """`items`, which are `make(*args)`: in another process they are made again from
        `args` (a Packed among them crossing once), and only when read."""
        packed = cls(items)
        packed._recipe = (make, args)
        return packed

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self._recipe is not None:
            return (_unopened, (b"", self._recipe, self._length))
        blob = self._blob or pickle.dumps(self._items, pickle.HIGHEST_PROTOCOL)
        return (_unopened, (blob, None, self._length))

    def _make(self) -> list[T]:
        if self._recipe is not None:
            make, args = self._recipe
            return make(*args)
        # pickled by our own worker process, read from the pool's pipe as its result was
        items: list[T] = pickle.loads(self._blob)  # noqa: S301
        self._blob = b""
        return items

    def __repr__(self) -> str:
        return f"Packed({self._length} items)"


class Joined(_Lazy[T]):
    """Sequences one after the other, as one, without opening them: the records of a batch
    prepared in parts (each part's a Packed). Its length is their lengths' sum; an item read
    opens them. Concatenating them into a list opened every part on the event loop — ~50 ms
    of one uninterrupted callback for a 5,000-record batch, while other requests waited."""

    __slots__ = ("_parts",)

    def __init__(self, parts: Sequence[Sequence[T]]) -> None:
        self._parts = list(parts)
        self._length = sum(len(part) for part in self._parts)
        self._items = None

    def _make(self) -> list[T]:
        return [item for part in self._parts for item in part]

    def __repr__(self) -> str:
        return f"Joined({self._length} items in {len(self._parts)} parts)"


def _unopened(
    blob: bytes, recipe: tuple[Callable[..., list[Any]], tuple[Any, ...]] | None, length: int
) -> Packed[Any]:
    """A Packed as it arrives: its blob, or the recipe it is made from."""
    packed: Packed[Any] = Packed.__new__(Packed)
    packed._items, packed._blob, packed._length, packed._recipe = None, blob, length, recipe
    return packed


def _ready() -> int:
    return os.getpid()


def _child_started(parent: int, preload: Sequence[str] = ()) -> None:
    os.nice(NICENESS)
    # Ctrl-C and the service manager's stop go to the serving process, which shuts the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in preload:
        importlib.import_module(module)
    settle_heap()  # what the imports built is kept out of the collector's sight too

    def leave_with_parent() -> None:
        # A serving process killed outright (SIGKILL) cannot shut its pool: do not outlive it.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=leave_with_parent, name="etrm-cpu-parent", daemon=True).start()
