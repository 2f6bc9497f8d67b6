"""The upstream's circuit breaker row and the maintenance windows (issue #8): read, changed
under the row's lock, audited on every transition.

The rules of how the breaker moves are not here (operations.circuit.step is passed in): this
module only guarantees that every change is made on the latest row, one writer at a time, with
the database's clock, and leaves an audit record when the state changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import audit
from ledger.db import change, sql
from ledger.rows import Actor, AuditEvent, Circuit, MaintenanceWindow, UpstreamView
from schemas.states import CircuitState

UPSTREAM = "etrm"
E = TypeVar("E")

_CIRCUIT_COLUMNS = (
    "state, since, reason, failures, window_started, next_probe_at, probe_owner, probe_until"
)
_WINDOW_COLUMNS = (
    "window_id, starts_at, ends_at, reason, created_by, created_at, cancelled_at, cancelled_by"
)


def _circuit(row: Any) -> Circuit:
    return Circuit(
        state=CircuitState(row.state),
        since=row.since,
        reason=row.reason,
        failures=row.failures,
        window_started=row.window_started,
        next_probe_at=row.next_probe_at,
        probe_owner=row.probe_owner,
        probe_until=row.probe_until,
    )


def _window(row: Any) -> MaintenanceWindow:
    return MaintenanceWindow(
        window_id=row.window_id,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        reason=row.reason,
        created_by=row.created_by,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
        cancelled_by=row.cancelled_by,
    )


async def _read_circuit(conn: AsyncConnection, *, lock: bool) -> tuple[Circuit, datetime]:
    row = (
        await conn.execute(
            sql(
                f"SELECT {_CIRCUIT_COLUMNS}, now() AS read_at FROM upstream_circuit "
                f"WHERE upstream = :u{' FOR UPDATE' if lock else ''}"
            ),
            {"u": UPSTREAM},
        )
    ).first()
    if row is None:  # created by the migration; recreated should someone delete it
        await conn.execute(
            sql("INSERT INTO upstream_circuit (upstream) VALUES (:u) ON CONFLICT DO NOTHING"),
            {"u": UPSTREAM},
        )
        return await _read_circuit(conn, lock=lock)
    return _circuit(row), row.read_at


async def read_view(engine: AsyncEngine) -> UpstreamView:
    """The breaker and every window not yet over, cancelled ones left out."""
    async with engine.connect() as conn:
        circuit, read_at = await _read_circuit(conn, lock=False)
        windows = await conn.execute(
            sql(
                f"SELECT {_WINDOW_COLUMNS} FROM maintenance_windows "
                "WHERE cancelled_at IS NULL AND ends_at > now() ORDER BY starts_at, window_id"
            )
        )
        return UpstreamView(circuit, tuple(_window(w) for w in windows), read_at)


async def apply(
    engine: AsyncEngine,
    events: Sequence[E],
    step: Callable[[Circuit, E, datetime], Circuit],
    actor: Actor,
) -> list[Circuit]:
    """Apply events in order to the breaker row under its lock, in one transaction; the row
    after each. A change of state is audited."""
    async with engine.begin() as conn:
        circuit, now = await _read_circuit(conn, lock=True)
        before, after = circuit, []
        for event in events:
            circuit = step(circuit, event, now)
            after.append(circuit)
        if circuit != before:
            await conn.execute(
                sql(
                    """
                    UPDATE upstream_circuit
                       SET state = :state, since = :since, reason = :reason,
                           failures = :failures, window_started = :window_started,
                           next_probe_at = :next_probe_at, probe_owner = :probe_owner,
                           probe_until = :probe_until
                     WHERE upstream = :u
                    """
                ),
                {
                    "u": UPSTREAM,
                    "state": str(circuit.state),
                    "since": circuit.since,
                    "reason": circuit.reason,
                    "failures": circuit.failures,
                    "window_started": circuit.window_started,
                    "next_probe_at": circuit.next_probe_at,
                    "probe_owner": circuit.probe_owner,
                    "probe_until": circuit.probe_until,
                },
            )
        transitions = []
        previous = before
        for state in after:
            if state.state is not previous.state:
                transitions.append(
                    AuditEvent(
                        actor,
                        f"upstream.circuit_{state.state}",
                        state=str(state.state),
                        subject_id=UPSTREAM,
                        detail=_transition_detail(previous, state),
                    )
                )
            previous = state
        await audit.append(conn, transitions)
    return after


def _transition_detail(before: Circuit, after: Circuit) -> str:
    detail = f"{before.state} -> {after.state}"
    if after.reason and after.state is CircuitState.OPEN:
        detail += f" ({after.reason})"
    if after.next_probe_at is not None and after.state is CircuitState.OPEN:
        detail += f"; next probe at {after.next_probe_at.isoformat()}"
    if after.state is CircuitState.HALF_OPEN:
        detail += f"; probe by {after.probe_owner}"
    return detail


async def add_window(
    engine: AsyncEngine,
    window_id: str,
    starts_at: datetime,
    ends_at: datetime,
    reason: str,
    actor: Actor,
) -> MaintenanceWindow:
    async with change(engine) as conn:
        row = (
            await conn.execute(
                sql(
                    f"""
                    INSERT INTO maintenance_windows
                           (window_id, starts_at, ends_at, reason, created_by)
                    VALUES (:id, :starts, :ends, :reason, :by)
                    RETURNING {_WINDOW_COLUMNS}
                    """
                ),
                {
                    "id": window_id,
                    "starts": starts_at,
                    "ends": ends_at,
                    "reason": reason,
                    "by": actor.name,
                },
            )
        ).one()
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "upstream.maintenance_added",
                    subject_id=window_id,
                    detail=f"{starts_at.isoformat()} .. {ends_at.isoformat()}: {reason}",
                )
            ],
        )
    return _window(row)


async def cancel_window(
    engine: AsyncEngine, window_id: str, actor: Actor
) -> MaintenanceWindow | None:
    """Cancel a window that is not over yet; None when there is no such window (unknown,
    already cancelled, or over)."""
    async with change(engine) as conn:
        row = (
            await conn.execute(
                sql(
                    f"""
                    UPDATE maintenance_windows
                       SET cancelled_at = now(), cancelled_by = :by
                     WHERE window_id = :id AND cancelled_at IS NULL AND ends_at > now()
                    RETURNING {_WINDOW_COLUMNS}
                    """
                ),
                {"id": window_id, "by": actor.name},
            )
        ).first()
        if row is None:
            return None
        await audit.append(
            conn, [AuditEvent(actor, "upstream.maintenance_cancelled", subject_id=window_id)]
        )
    return _window(row)


class CircuitStore:
    """The breaker as a worker uses it (workers.breaker.BreakerStore)."""

    def __init__(self, engine: AsyncEngine, actor: Actor) -> None:
        self.engine = engine
        self.actor = actor

    async def view(self) -> UpstreamView:
        return await read_view(self.engine)

    async def apply(
        self, events: Sequence[E], step: Callable[[Circuit, E, datetime], Circuit]
    ) -> list[Circuit]:
        return await apply(self.engine, events, step, self.actor)
