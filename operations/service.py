"""What operators do — replay dead letters, discard them, release or reject holds — as one
service, so the HTTP API and the command line cannot drift apart.

Rules kept here:
- a replay republishes the original record with its original message id (the ledger and the
  upstream's Idempotency-Key make a second effect impossible), in the order the records were
  first accepted; a stale revision ends `superseded`;
- a replay of more than ETRM_REPLAY_APPROVAL_THRESHOLD records, or of more than one desk's
  records, waits for a second operator (four eyes, by subject, case-insensitively);
- a dead letter belongs to one replay at a time; racing operators get "nothing to replay";
- discarding a dead letter closes it without delivery; with contract sequencing the records
  parked behind it continue, in order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import reconciliation as recon
from ledger import upstream
from ledger.crypto import PayloadCipher
from ledger.db import bounded_change
from ledger.rows import Actor, MaintenanceWindow
from operations import circuit, rules
from operations.publishing import Progress, Republisher
from schemas.records import iso_z
from schemas.states import CircuitState

log = structlog.get_logger("etrm.ops")


class OperationRefused(Exception):
    """An operator action that cannot take effect; `code` says why (the API maps it)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass(frozen=True, slots=True)
class ReplayRequested:
    replay_id: str
    state: str
    count: int
    needs_approval: bool
    desks: list[str]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class UpstreamOperations:
    """The upstream's breaker and maintenance windows, for operators (issue #8)."""

    def __init__(self, engine: AsyncEngine, *, timeout_s: float | None = None) -> None:
        self.engine = engine
        # Reads and changes give up after this long (TimeoutError: the database is away,
        # answered 503); a change only until it sends its COMMIT (ledger.db.bounded_change),
        # so a change cut off never took effect and one that was not cut off is never unknown.
        self.timeout_s = timeout_s

    async def upstream_status(self) -> dict[str, Any]:
        async with asyncio.timeout(self.timeout_s):
            view = await upstream.read_view(self.engine)
        c = view.circuit
        waiting = circuit.waiting_of(c, view.windows, view.read_at)
        return {
            "circuit": str(c.state),
            "since": iso_z(c.since),
            "next_probe_at": iso_z(c.next_probe_at) if c.state is not CircuitState.CLOSED else None,
            "reason": c.reason if c.state is not CircuitState.CLOSED else None,
            "failures": c.failures,
            "probe_owner": c.probe_owner,
            "maintenance": [window_body(w) for w in view.windows],
            "waiting": {"reason": str(waiting[0]), "until": iso_z(waiting[1])} if waiting else None,
        }

    async def add_maintenance(
        self, actor: Actor, starts_at: datetime, ends_at: datetime, reason: str
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        problem = circuit.window_problem(starts_at, ends_at, now)
        if problem is not None:
            raise OperationRefused("invalid_window", problem)
        async with bounded_change(self.engine, self.timeout_s):
            window = await upstream.add_window(
                self.engine, new_id("mw"), starts_at, ends_at, reason, actor
            )
        log.info(
            "maintenance_window_added",
            window_id=window.window_id,
            starts_at=iso_z(starts_at),
            ends_at=iso_z(ends_at),
            operator=actor.name,
        )
        return window_body(window)

    async def cancel_maintenance(self, window_id: str, actor: Actor) -> dict[str, Any]:
        async with bounded_change(self.engine, self.timeout_s):
            window = await upstream.cancel_window(self.engine, window_id, actor)
        if window is None:
            raise OperationRefused("not_found", "no such maintenance window (or it is over)")
        log.info("maintenance_window_cancelled", window_id=window_id, operator=actor.name)
        return window_body(window)


def window_body(w: MaintenanceWindow) -> dict[str, Any]:
    return {
        "id": w.window_id,
        "from": iso_z(w.starts_at),
        "until": iso_z(w.ends_at),
        "reason": w.reason,
        "created_by": w.created_by,
        "created_at": iso_z(w.created_at),
        "cancelled_at": iso_z(w.cancelled_at),
        "cancelled_by": w.cancelled_by,
    }


class Operations(UpstreamOperations):
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: PayloadCipher,
        republisher: Republisher,
        *,
        approval_threshold: int,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(engine, timeout_s=timeout_s)
        self.cipher = cipher
        self.republisher = republisher
        self.approval_threshold = approval_threshold

    # -- reads -----------------------------------------------------------------------------------

    async def list_dead_letters(
        self, where: recon.DeadLetterFilter, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        async with asyncio.timeout(self.timeout_s):
            return await recon.list_dead_letters(self.engine, where, limit=limit, cursor=cursor)

    async def replay_status(self, replay_id: str) -> dict[str, Any] | None:
        async with asyncio.timeout(self.timeout_s):
            return await recon.get_replay(self.engine, replay_id)

    async def list_holds(
        self, *, state: str | None, desk: str | None, limit: int
    ) -> list[dict[str, Any]]:
        async with asyncio.timeout(self.timeout_s):
            return await recon.list_holds(self.engine, state=state, desk=desk, limit=limit)

    # -- replay --------------------------------------------------------------------------------

    async def preview_replay(
        self, *, message_ids: Sequence[str] | None, where: recon.DeadLetterFilter | None
    ) -> dict[str, Any]:
        async with asyncio.timeout(self.timeout_s):
            items = await recon.replay_candidates(self.engine, message_ids=message_ids, where=where)
        desks = sorted({i.desk for i in items})
        return {
            "dry_run": True,
            "count": len(items),
            "needs_approval": rules.needs_approval(len(items), desks, self.approval_threshold),
            "desks": desks,
            "items": [
                {
                    "dead_letter_id": i.dead_letter_id,
                    "message_id": i.message_id,
                    "desk": i.desk,
                    "contract_id": i.contract_id,
                    "reason": i.reason,
                }
                for i in items
            ],
        }

    async def request_replay(
        self,
        actor: Actor,
        *,
        message_ids: Sequence[str] | None,
        where: recon.DeadLetterFilter | None,
        reason: str,
    ) -> ReplayRequested:
        replay_id = new_id("replay")
        async with bounded_change(self.engine, self.timeout_s):
            candidates = await recon.replay_candidates(
                self.engine, message_ids=message_ids, where=where
            )
            items, needs_approval = await recon.create_replay(
                self.engine,
                replay_id=replay_id,
                reason=reason,
                actor=actor,
                candidates=candidates,
                needs_approval=lambda count, desks: rules.needs_approval(
                    count, desks, self.approval_threshold
                ),
            )
        if not items:
            raise OperationRefused("nothing_to_replay", "no open, replayable dead letters match")
        state = "pending_approval" if needs_approval else "approved"
        log.info(
            "replay_requested",
            replay_id=replay_id,
            operator=actor.name,
            count=len(items),
            needs_approval=needs_approval,
        )
        return ReplayRequested(
            replay_id, state, len(items), needs_approval, sorted({i.desk for i in items})
        )

    async def approve_replay(self, replay_id: str, actor: Actor, reason: str | None) -> None:
        try:
            async with bounded_change(self.engine, self.timeout_s):
                await recon.approve_replay(
                    self.engine, replay_id, actor, reason, rules.same_operator
                )
        except recon.Refused as exc:
            raise OperationRefused(exc.code, exc.detail) from None
        log.info("replay_approved", replay_id=replay_id, operator=actor.name)

    async def run_replay(
        self, replay_id: str, actor: Actor, progress: Progress | None = None
    ) -> bool:
        return await self.republisher.run(replay_id, actor, progress)

    async def resume_replays(self, actor: Actor) -> int:
        return await self.republisher.run_runnable(actor)

    # -- discard ---------------------------------------------------------------------------------

    async def discard(self, dead_letter_id: str, actor: Actor, reason: str) -> dict[str, Any]:
        job_id = new_id("replay_cont")
        try:
            async with bounded_change(self.engine, self.timeout_s):
                closed = await recon.discard(self.engine, dead_letter_id, actor, reason)
                # Records parked behind it (contract sequencing) go on now, in order (no longer
                # cut off: the discard committed); their copies are published by whoever runs
                # the continuation (the caller at once, housekeeping else).
                continued = await recon.continue_parked(self.engine, job_id, actor)
        except recon.Refused as exc:
            raise OperationRefused(exc.code, exc.detail) from None
        log.info(
            "dead_letter_discarded",
            dead_letter_id=dead_letter_id,
            operator=actor.name,
            continued=continued,
        )
        return {
            "dead_letter_id": dead_letter_id,
            "message_id": closed["message_id"],
            "status": "discarded",
            "continued": continued,
            "continuation_id": job_id if continued else None,
        }

    # -- holds ---------------------------------------------------------------------------------

    async def decide_hold(
        self, hold_id: str, decision: str, actor: Actor, reason: str
    ) -> dict[str, Any]:
        try:
            async with bounded_change(self.engine, self.timeout_s):
                result = await recon.decide_hold(
                    self.engine,
                    hold_id,
                    decision,
                    actor,
                    reason,
                    self.cipher,
                    new_id("dl"),
                    self.republisher.sealer.seal,
                )
        except recon.Refused as exc:
            raise OperationRefused(exc.code, exc.detail) from None
        log.info("hold_decided", hold_id=hold_id, decision=decision, operator=actor.name)
        return result


def operator_actor(
    name: str, desk: str = "ops", token_id: str | None = None, address: str | None = None
) -> Actor:
    return Actor("operator", name, desk, token_id or uuid.uuid4().hex, address)
