"""A worker's side of the shared upstream circuit breaker (issue #8): a cached view of the
breaker row and the maintenance windows, refreshed in the background; a gate every chain passes
before it claims a record (`wait_turn`) and before each POST (`admit`); and the reports of
what each attempt showed (`report`).

Rules kept here:
- while the breaker is open, or a maintenance window holds, no chain claims a record or sends
  one: chains wait on the gate without touching the ledger;
- when a probe is due, one chain of this worker (the reservation) goes on to claim a record;
  it sends only if it wins the probe on the shared row, so a group of workers sends one probe;
- answers change the shared row only when they could change it (a failure, or a success while
  the row shows failures or is not closed), in groups: a healthy upstream costs no writes;
- when the database cannot be reached, the worker goes on with the view it has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

import structlog

from ledger.rows import Circuit, UpstreamView
from operations.circuit import (
    BreakerConfig,
    Event,
    Failed,
    Go,
    Hold,
    ProbeDue,
    Succeeded,
    TakeProbe,
    Verdict,
    maintenance_until,
    step,
    verdict,
)
from runtime.aio import stop_tasks
from schemas.states import CircuitState
from workers import metrics
from workers.batching import GroupCommitter

log = structlog.get_logger("etrm.worker")

# How long an answer's report may wait for the database before the worker goes on with what
# it knows (the report itself is kept and written when the database is back).
REPORT_WAIT_S = 2.0


class BreakerStore(Protocol):
    """ledger.upstream.CircuitStore; a fake in the unit tests."""

    async def view(self) -> UpstreamView: ...
    async def apply(
        self, events: Sequence[Event], step: Callable[[Circuit, Event, datetime], Circuit]
    ) -> list[Circuit]: ...


class Admission(Enum):
    GO = "go"
    PROBE = "probe"  # this POST is the group's probe
    HOLD = "hold"  # send nothing: hand the record back and wait


class Health(Enum):
    """What one attempt showed about the upstream."""

    UP = "up"  # it answered (taken, or a permanent rejection)
    DOWN = "down"  # a transient failure, or no token
    UNKNOWN = "unknown"  # a 401: says nothing about an outage


def _closed_view() -> UpstreamView:
    now = datetime.now(UTC)
    return UpstreamView(Circuit(CircuitState.CLOSED, now), (), now)


class Breaker:
    def __init__(
        self,
        store: BreakerStore,
        config: BreakerConfig,
        *,
        owner: str,
        probe_lease_s: float,
        announced_outage_s: float,
        refresh_s: float = 0.5,
        margin_s: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.config = config
        self.owner = owner
        self.probe_lease_s = probe_lease_s
        self.announced_outage_s = announced_outage_s
        self.refresh_s = refresh_s
        self.margin_s = margin_s
        self.clock = clock
        self.view = _closed_view()
        self._changed = asyncio.Event()
        self._reserved = False
        self._events: GroupCommitter[Event, Circuit] = GroupCommitter(
            "circuit", self._apply, retry_delay_s=0.5, max_retry_delay_s=2.0
        )
        self._task: asyncio.Task[None] | None = None
        self._show(self.view.circuit)

    # -- the view --------------------------------------------------------------------------

    def verdict(self) -> Verdict:
        return verdict(self.view.circuit, self.view.windows, self.clock(), self.margin_s)

    @property
    def sending(self) -> bool:
        return isinstance(self.verdict(), Go)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _show(self, circuit: Circuit) -> None:
        for state in CircuitState:
            metrics.CIRCUIT_STATE.labels(str(state)).set(1 if state is circuit.state else 0)

    def _take(self, view: UpstreamView) -> None:
        before = self.view
        self.view = view
        if view.circuit.state is not before.circuit.state:
            self._show(view.circuit)
            log.warning(
                f"circuit_{view.circuit.state}",
                reason=view.circuit.reason,
                since=view.circuit.since.isoformat(),
                next_probe_at=view.circuit.next_probe_at.isoformat()
                if view.circuit.next_probe_at
                else None,
            )
        now = self.clock()
        held = maintenance_until(view.windows, now, self.margin_s) is not None
        metrics.MAINTENANCE_ACTIVE.set(1 if held else 0)
        if view.circuit != before.circuit or view.windows != before.windows:
            self._pulse()

    def _take_circuit(self, circuit: Circuit) -> None:
        self._take(replace(self.view, circuit=circuit))

    async def refresh(self) -> None:
        self._take(await self.store.view())

    async def run(self) -> None:
        """Keep the view fresh (another worker's report, an operator's window)."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.debug("circuit_refresh_failed", error=type(exc).__name__)
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="circuit-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        await self._events.stop()

    # -- the gate --------------------------------------------------------------------------

    async def wait_turn(self, stopped: asyncio.Event) -> bool | None:
        """Wait until a chain may claim a record: False to go on as usual, True when it holds
        this worker's probe reservation (release it with `release`), None when stopped."""
        while not stopped.is_set():
            now_verdict = self.verdict()
            if isinstance(now_verdict, Go):
                return False
            if isinstance(now_verdict, ProbeDue) and not self._reserved:
                self._reserved = True
                return True
            timeout = self.refresh_s * 2
            if isinstance(now_verdict, Hold) and now_verdict.until is not None:
                left = (now_verdict.until - self.clock()).total_seconds()
                timeout = max(0.01, min(timeout, left))
            changed = self._changed
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stopped.wait())]
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        return None

    def release(self) -> None:
        """The chain holding the probe reservation is done with it."""
        if self._reserved:
            self._reserved = False
            self._pulse()

    async def admit(self, reserved: bool) -> Admission:
        """Just before a POST: may it go, and is it the probe?"""
        now_verdict = self.verdict()
        if isinstance(now_verdict, Go):
            return Admission.GO
        if not (isinstance(now_verdict, ProbeDue) and reserved):
            return Admission.HOLD
        try:
            circuit = await self._report(TakeProbe(self.owner, self.probe_lease_s))
        except Exception:
            return Admission.HOLD
        if circuit.state is CircuitState.HALF_OPEN and circuit.probe_owner == self.owner:
            log.info("circuit_probe", owner=self.owner)
            return Admission.PROBE
        return Admission.HOLD

    async def report(
        self, health: Health, *, probe: bool, retry_after_s: float | None = None
    ) -> bool:
        """Record what an attempt showed; True when the upstream counts as away now (the
        attempt's failure is the outage's, not the record's)."""
        if probe:
            metrics.CIRCUIT_PROBES.labels(health.value).inc()
        if health is Health.UP:
            circuit = self.view.circuit
            if circuit.state is CircuitState.CLOSED and circuit.failures == 0 and not probe:
                return False
            with contextlib.suppress(Exception):
                await self._report(Succeeded(probe=probe))
            return False
        if health is Health.DOWN:
            announced = (
                retry_after_s
                if retry_after_s is not None and retry_after_s >= self.announced_outage_s
                else None
            )
            with contextlib.suppress(Exception):
                await self._report(Failed(probe=probe, announced_s=announced))
        return not self.sending

    async def _report(self, event: Event) -> Circuit:
        future = self._events.submit(event)
        async with asyncio.timeout(REPORT_WAIT_S):
            return await asyncio.shield(future)

    async def _apply(self, events: Sequence[Event]) -> list[Circuit]:
        after = await self.store.apply(events, self._step)
        if after:
            self._take_circuit(after[-1])
        return after

    def _step(self, circuit: Circuit, event: Event, now: datetime) -> Circuit:
        return step(circuit, event, now, self.config)
