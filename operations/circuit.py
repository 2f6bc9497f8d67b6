"""The upstream circuit breaker as plain functions (issue #8): how the shared row moves on each
event, and whether a worker may send right now. No I/O: ledger.upstream applies `step` under
the row's lock; workers.breaker, the intake and the command line read `verdict`.

Rules kept here:
- closed -> open after `failures` transient failures in a row (no success between them) within
  `window_s`; a 503 whose Retry-After reaches the announced-outage threshold opens it at once
  until then (the upstream announced a maintenance);
- open -> half_open when the next probe is due: one worker takes the probe (a lease on it, so
  a probe whose worker died is taken over), sends one record, and its answer closes the
  breaker (success) or opens it again for another interval (failure);
- any answer that shows the upstream working (taken, or a permanent 4xx rejection) closes it;
  a 401 says nothing about an outage and changes nothing;
- inside a maintenance window (declared ahead) nothing is sent, whatever the breaker says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ledger.rows import Circuit, MaintenanceWindow
from schemas.states import CircuitState, Waiting

C = CircuitState

REASON_FAILURES = "failures"
REASON_ANNOUNCED = "announced"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int
    window_s: float
    probe_interval_s: float


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failed:
    """A transient failure (5xx, 408/425/429, timeout, no connection, no token)."""

    probe: bool = False
    announced_s: float | None = None  # the upstream announced an outage this long


@dataclass(frozen=True, slots=True)
class Succeeded:
    """An answer that shows the upstream working."""

    probe: bool = False


@dataclass(frozen=True, slots=True)
class TakeProbe:
    owner: str
    lease_s: float


Event = Failed | Succeeded | TakeProbe


def _open(c: Circuit, now: datetime, until: datetime, reason: str) -> Circuit:
    return replace(
        c,
        state=C.OPEN,
        since=now if c.state is not C.OPEN else c.since,
        reason=reason,
        failures=0,
        window_started=None,
        next_probe_at=until,
        probe_owner=None,
        probe_until=None,
    )


def _closed(c: Circuit, now: datetime) -> Circuit:
    return Circuit(C.CLOSED, now if c.state is not C.CLOSED else c.since)


def probe_due(c: Circuit, now: datetime) -> bool:
    """Open with its next probe due, or half open with a probe whose lease ran out."""
    if c.state is C.OPEN:
        return c.next_probe_at is None or c.next_probe_at <= now
    if c.state is C.HALF_OPEN:
        return c.probe_until is None or c.probe_until < now
    return False


def step(c: Circuit, event: Event, now: datetime, cfg: BreakerConfig) -> Circuit:
    """The row after `event` happened at `now` (the database's clock)."""
    interval = timedelta(seconds=cfg.probe_interval_s)
    match event:
        case Failed(announced_s=announced) if announced is not None:
            until = now + timedelta(seconds=announced)
            if c.state is C.OPEN and c.next_probe_at is not None and c.next_probe_at > until:
                until = c.next_probe_at
            return _open(c, now, until, REASON_ANNOUNCED)
        case Failed(probe=True) if c.state is C.HALF_OPEN:
            return _open(c, now, now + interval, REASON_FAILURES)
        case Failed() if c.state is C.CLOSED:
            fresh = c.window_started is None or (now - c.window_started).total_seconds() > (
                cfg.window_s
            )
            failures = 1 if fresh else c.failures + 1
            if failures >= cfg.failures:
                return _open(c, now, now + interval, REASON_FAILURES)
            return replace(c, failures=failures, window_started=now if fresh else c.window_started)
        case Failed():
            return c  # already open: answers to requests sent before it opened change nothing
        case Succeeded():
            if c.state is C.CLOSED and c.failures == 0 and c.window_started is None:
                return c
            return _closed(c, now)
        case TakeProbe(owner=owner, lease_s=lease_s):
            if not probe_due(c, now):
                return c
            return replace(
                c,
                state=C.HALF_OPEN,
                since=now if c.state is not C.HALF_OPEN else c.since,
                probe_owner=owner,
                probe_until=now + timedelta(seconds=lease_s),
            )
    raise AssertionError(event)  # pragma: no cover - every event is matched


# -- may a worker send now? ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Go:
    pass


@dataclass(frozen=True, slots=True)
class ProbeDue:
    """Nothing may be sent but one probe, which is due now."""


@dataclass(frozen=True, slots=True)
class Hold:
    reason: Waiting
    until: datetime | None


Verdict = Go | ProbeDue | Hold


def maintenance_until(
    windows: tuple[MaintenanceWindow, ...] | list[MaintenanceWindow],
    now: datetime,
    margin_s: float = 0.0,
) -> datetime | None:
    """The end of the maintenance `now` falls in (windows that touch or overlap run on as one),
    or None. A window counts from `margin_s` before its start, so no request that starts just
    before it arrives inside it."""
    margin = timedelta(seconds=margin_s)
    current = [
        w for w in windows if w.cancelled_at is None and w.starts_at - margin <= now < w.ends_at
    ]
    if not current:
        return None
    until = max(w.ends_at for w in current)
    extended = True
    while extended:
        extended = False
        for w in windows:
            if w.cancelled_at is None and w.starts_at - margin <= until < w.ends_at:
                until, extended = w.ends_at, True
    return until


def verdict(
    c: Circuit,
    windows: tuple[MaintenanceWindow, ...] | list[MaintenanceWindow],
    now: datetime,
    margin_s: float = 0.0,
) -> Verdict:
    until = maintenance_until(windows, now, margin_s)
    if until is not None:
        return Hold(Waiting.MAINTENANCE, until)
    if c.state is C.CLOSED:
        return Go()
    if probe_due(c, now):
        return ProbeDue()
    waiting = Waiting.MAINTENANCE if c.reason == REASON_ANNOUNCED else Waiting.CIRCUIT_OPEN
    # open: until the next probe; half open: until the probe's answer (or its lease ends)
    return Hold(waiting, c.next_probe_at if c.state is C.OPEN else c.probe_until)


# -- what operators see and declare --------------------------------------------------------

MAX_WINDOW = timedelta(days=14)


def window_problem(starts_at: datetime, ends_at: datetime, now: datetime) -> str | None:
    """Why a maintenance window cannot be declared, or None."""
    if starts_at.tzinfo is None or ends_at.tzinfo is None:
        return "from and until need a time zone (e.g. 2026-12-06T02:00:00Z)"
    if ends_at <= starts_at:
        return "until must be after from"
    if ends_at <= now:
        return "the window is already over"
    if ends_at - starts_at > MAX_WINDOW:
        return f"a window may last at most {MAX_WINDOW.days} days"
    return None


def waiting_of(
    c: Circuit, windows: tuple[MaintenanceWindow, ...] | list[MaintenanceWindow], now: datetime
) -> tuple[Waiting, datetime | None] | None:
    """Why unsettled records are not being sent right now, and until when (None: they are)."""
    match verdict(c, windows, now):
        case Hold(reason=reason, until=until):
            return reason, until
        case ProbeDue():
            return Waiting.CIRCUIT_OPEN, None
    return None
