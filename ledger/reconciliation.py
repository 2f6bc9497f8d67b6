"""Dead letters, replays and holds: the SQL behind the operations desk's daily work.

Rules kept here:
- a dead letter is replayed at most once at a time (a partial unique index on pending replay
  items) and marked `replayed` only after its record is back on the broker;
- before a replayed record is published, its message goes from `dead_lettered` back to
  `queued`, so the worker picks it up again; nothing else ever leaves a final state;
- a hold is decided once (`open` -> `released` | `rejected`), with its message, in one
  transaction, with its audit record.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import audit
from ledger.audit import Actor, AuditEvent
from ledger.crypto import PayloadCipher
from ledger.store import insert_dead_letters

# A record the upstream refused or never took can be sent again. Not replayable: a bad
# signature or shape (nothing trustworthy to send) and a rejected drift hold (the upstream
# already booked it; a correction is a new revision from the desk).
REPLAYABLE_REASONS = ("upstream_rejected", "retries_exhausted", "token_unavailable")
FILTER_KEYS = ("desk", "settlement_run_id", "contract_id", "reason", "status", "since", "until")

_DEAD_LETTER_COLUMNS = """
    dead_letter_id, message_id, desk, settlement_run_id, contract_id, reason, status,
    error_status, attempts, last_error, first_attempt_at, last_attempt_at, source_topic,
    source_partition, source_offset, created_at
"""


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    desk: str | None = None
    settlement_run_id: str | None = None
    contract_id: str | None = None
    reason: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses, params = ["TRUE"], {}
        for name in ("desk", "settlement_run_id", "contract_id", "reason", "status"):
            value = getattr(self, name)
            if value is not None:
                clauses.append(f"{name} = :{name}")
                params[name] = value
        if self.since is not None:
            clauses.append("created_at >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append("created_at < :until")
            params["until"] = self.until
        return " AND ".join(clauses), params


def encode_cursor(created_at: datetime, dead_letter_id: str) -> str:
    raw = f"{created_at.isoformat()}|{dead_letter_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    moment, _, dead_letter_id = raw.partition("|")
    return datetime.fromisoformat(moment), dead_letter_id


async def list_dead_letters(
    engine: AsyncEngine, where: DeadLetterFilter, *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    clause, params = where.where()
    if cursor:
        after_at, after_id = decode_cursor(cursor)
        clause += " AND (created_at, dead_letter_id) > (:after_at, :after_id)"
        params.update(after_at=after_at, after_id=after_id)
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters WHERE {clause} "
                "ORDER BY created_at, dead_letter_id LIMIT :limit"
            ),
            {**params, "limit": limit + 1},
        )
        items = [dict(r._mapping) for r in rows]
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor(items[-1]["created_at"], items[-1]["dead_letter_id"])
    return items, next_cursor


async def get_dead_letter(engine: AsyncEngine, dead_letter_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    f"SELECT {_DEAD_LETTER_COLUMNS}, kafka_headers FROM dead_letters "
                    "WHERE dead_letter_id = :id"
                ),
                {"id": dead_letter_id},
            )
        ).first()
    return dict(row._mapping) if row else None


# -- replays --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayCandidate:
    dead_letter_id: str
    message_id: str
    desk: str
    contract_id: str | None
    reason: str


async def replay_candidates(
    engine: AsyncEngine,
    *,
    message_ids: Sequence[str] | None,
    where: DeadLetterFilter | None,
    limit: int = 100_000,
) -> list[ReplayCandidate]:
    """Open, replayable dead letters in the order they were dead-lettered (which keeps each
    contract's order), one per message."""
    clause, params = (where or DeadLetterFilter()).where()
    if message_ids is not None:
        clause += " AND message_id = ANY(CAST(:ids AS text[]))"
        params["ids"] = list(message_ids)
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                f"""
                SELECT DISTINCT ON (message_id) dead_letter_id, message_id, desk, contract_id,
                       reason, created_at, source_offset
                  FROM dead_letters
                 WHERE {clause} AND status = 'open' AND message_id IS NOT NULL
                   AND reason IN {REPLAYABLE_REASONS!r}
                 ORDER BY message_id, created_at DESC
                 LIMIT :limit
                """
            ),
            {**params, "limit": limit},
        )
        found = sorted(rows, key=lambda r: (r.created_at, r.source_offset))
    return [
        ReplayCandidate(r.dead_letter_id, r.message_id, r.desk, r.contract_id, r.reason)
        for r in found
    ]


async def create_replay(
    engine: AsyncEngine,
    *,
    replay_id: str,
    needs_approval: bool,
    reason: str,
    actor: Actor,
    items: Sequence[ReplayCandidate],
) -> None:
    desks = sorted({i.desk for i in items})
    async with engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO replays (replay_id, state, reason, requested_by, requested_desk,
                                     item_count, desks)
                VALUES (:id, :state, :reason, :by, :desk, :count, CAST(:desks AS text[]))
                """
            ),
            {
                "id": replay_id,
                "state": "pending_approval" if needs_approval else "approved",
                "reason": reason,
                "by": actor.name,
                "desk": actor.desk or "",
                "count": len(items),
                "desks": desks,
            },
        )
        await conn.execute(
            text(
                """
                INSERT INTO replay_items (replay_id, ord, dead_letter_id, message_id)
                SELECT :id, ord, dead_letter_id, message_id
                  FROM unnest(CAST(:dls AS text[]), CAST(:mids AS text[])) WITH ORDINALITY
                       AS t(dead_letter_id, message_id, ord)
                """
            ),
            {
                "id": replay_id,
                "dls": [i.dead_letter_id for i in items],
                "mids": [i.message_id for i in items],
            },
        )
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "replay.requested",
                    subject_id=replay_id,
                    detail=f"{len(items)} dead letter(s) from {', '.join(desks) or 'no desk'}; "
                    f"reason: {reason}; needs approval: {needs_approval}",
                )
            ],
        )


class ReplayRefused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


async def approve_replay(
    engine: AsyncEngine, replay_id: str, actor: Actor, reason: str | None
) -> None:
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                text("SELECT state, requested_by FROM replays WHERE replay_id = :id FOR UPDATE"),
                {"id": replay_id},
            )
        ).first()
        if row is None:
            raise ReplayRefused(404, "not_found", "no such replay")
        if row.requested_by == actor.name:
            raise ReplayRefused(
                403,
                "four_eyes",
                "a replay must be approved by a different operator than the one who requested it",
            )
        if row.state != "pending_approval":
            raise ReplayRefused(409, "not_pending", f"replay is {row.state}, not awaiting approval")
        await conn.execute(
            text(
                "UPDATE replays SET state = 'approved', approved_by = :by, "
                "approval_reason = :reason, approved_at = now() WHERE replay_id = :id"
            ),
            {"by": actor.name, "reason": reason, "id": replay_id},
        )
        await audit.append(
            conn, [AuditEvent(actor, "replay.approved", subject_id=replay_id, detail=reason)]
        )


async def take_replay(engine: AsyncEngine, replay_id: str, lease_s: float) -> bool:
    """Start or resume a replay; False when it is not runnable or another runner holds it."""
    async with engine.begin() as conn:
        taken = await conn.execute(
            text(
                """
                UPDATE replays SET state = 'running',
                       lease_until = now() + make_interval(secs => :lease)
                 WHERE replay_id = :id
                   AND (state = 'approved'
                        OR (state = 'running' AND (lease_until IS NULL OR lease_until < now())))
                RETURNING 1
                """
            ),
            {"id": replay_id, "lease": lease_s},
        )
        return taken.first() is not None


async def pending_replay_items(
    engine: AsyncEngine, replay_id: str, limit: int, cipher: PayloadCipher
) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                """
                SELECT i.ord, i.dead_letter_id, i.message_id, d.kafka_key, d.kafka_value,
                       d.value_kid,
                       d.kafka_headers, d.source_topic, d.status AS dead_letter_status,
                       (SELECT count(*) FROM replay_items p
                         WHERE p.message_id = i.message_id AND p.state = 'published')
                           AS earlier_replays
                  FROM replay_items i JOIN dead_letters d USING (dead_letter_id)
                 WHERE i.replay_id = :id AND i.state = 'pending'
                 ORDER BY i.ord LIMIT :limit
                """
            ),
            {"id": replay_id, "limit": limit},
        )
        items = [dict(r._mapping) for r in rows]
    for item in items:
        item["kafka_value"] = cipher.open(
            item.pop("value_kid"), item["kafka_value"], item["dead_letter_id"]
        )
    return items


async def requeue_for_replay(
    engine: AsyncEngine, replay_id: str, message_ids: Sequence[str], actor: Actor, lease_s: float
) -> None:
    """Before publishing: dead-lettered messages go back to `queued` so a worker takes them."""
    async with engine.begin() as conn:
        result = await conn.execute(
            text(
                """
                UPDATE messages SET state = 'queued', updated_at = now()
                 WHERE message_id = ANY(CAST(:ids AS text[])) AND state = 'dead_lettered'
                RETURNING message_id
                """
            ),
            {"ids": list(message_ids)},
        )
        await conn.execute(
            text(
                "UPDATE replays SET lease_until = now() + make_interval(secs => :lease) "
                "WHERE replay_id = :id"
            ),
            {"id": replay_id, "lease": lease_s},
        )
        await audit.append(
            conn,
            audit.state_events(
                actor, "queued", [r.message_id for r in result], detail=f"replay {replay_id}"
            ),
        )


async def mark_replayed(
    engine: AsyncEngine, replay_id: str, items: Sequence[dict[str, Any]], actor: Actor
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                """
                UPDATE replay_items SET state = 'published', published_at = now()
                 WHERE replay_id = :id AND ord = ANY(CAST(:ords AS int[]))
                """
            ),
            {"id": replay_id, "ords": [i["ord"] for i in items]},
        )
        await conn.execute(
            text(
                "UPDATE dead_letters SET status = 'replayed' "
                "WHERE dead_letter_id = ANY(CAST(:ids AS text[]))"
            ),
            {"ids": [i["dead_letter_id"] for i in items]},
        )
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "dead_letter.replayed",
                    message_id=i["message_id"],
                    subject_id=i["dead_letter_id"],
                    detail=f"replay {replay_id}",
                )
                for i in items
            ],
        )


async def finish_replay(engine: AsyncEngine, replay_id: str, actor: Actor) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE replays SET state = 'completed', completed_at = now(), "
                "lease_until = NULL WHERE replay_id = :id AND state = 'running'"
            ),
            {"id": replay_id},
        )
        await audit.append(conn, [AuditEvent(actor, "replay.completed", subject_id=replay_id)])


async def get_replay(engine: AsyncEngine, replay_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT * FROM replays WHERE replay_id = :id"), {"id": replay_id}
            )
        ).first()
        if row is None:
            return None
        grouped = await conn.execute(
            text("SELECT state, count(*) FROM replay_items WHERE replay_id = :id GROUP BY state"),
            {"id": replay_id},
        )
        counts: dict[str, int] = {state: n for state, n in grouped}  # noqa: C416 - typed rows
        result = dict(row._mapping)
        result["progress"] = {
            "published": counts.get("published", 0),
            "pending": counts.get("pending", 0),
        }
        return result


async def runnable_replays(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT replay_id FROM replays WHERE state = 'approved' OR (state = 'running' "
                "AND (lease_until IS NULL OR lease_until < now())) ORDER BY created_at"
            )
        )
        return [r.replay_id for r in rows]


# -- holds ----------------------------------------------------------------------------------


async def list_holds(
    engine: AsyncEngine, *, state: str | None, desk: str | None, limit: int
) -> list[dict[str, Any]]:
    clauses: list[str] = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if state:
        clauses.append("state = :state")
        params["state"] = state
    if desk:
        clauses.append("desk = :desk")
        params["desk"] = desk
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                f"""
                SELECT hold_id, message_id, desk, contract_id, submitted_position_mwh,
                       reconciled_position_mwh, variance, state, created_at, decided_at,
                       decided_by, decision_reason
                  FROM holds WHERE {" AND ".join(clauses)}
                 ORDER BY created_at LIMIT :limit
                """
            ),
            params,
        )
        return [dict(r._mapping) for r in rows]


async def hold_for_decision(
    engine: AsyncEngine, hold_id: str, cipher: PayloadCipher
) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    """
                SELECT h.hold_id, h.state, h.message_id, h.desk, h.contract_id, m.payload,
                       m.payload_kid,
                       m.trader, m.trace_id, m.batch_id, m.topic, m.source_partition,
                       m.source_offset, m.settlement_run_id, m.attempts, m.first_attempt_at,
                       m.last_attempt_at, h.submitted_position_mwh, h.reconciled_position_mwh,
                       h.variance
                  FROM holds h JOIN messages m USING (message_id)
                 WHERE h.hold_id = :id
                """
                ),
                {"id": hold_id},
            )
        ).first()
    if row is None:
        return None
    hold = dict(row._mapping)
    hold["payload"] = cipher.open(hold.pop("payload_kid"), hold["payload"], hold["message_id"])
    return hold


async def decide_hold(
    engine: AsyncEngine,
    hold_id: str,
    decision: str,
    actor: Actor,
    reason: str,
    dead_letter: dict[str, Any] | None,
    cipher: PayloadCipher,
) -> bool:
    """`released` or `rejected`; False when the hold was already decided."""
    async with engine.begin() as conn:
        decided = (
            await conn.execute(
                text(
                    """
                UPDATE holds SET state = :decision, decided_at = now(), decided_by = :by,
                       decision_reason = :reason
                 WHERE hold_id = :id AND state = 'open'
                RETURNING message_id
                """
                ),
                {"decision": decision, "by": actor.name, "reason": reason, "id": hold_id},
            )
        ).first()
        if decided is None:
            return False
        await conn.execute(
            text(
                "UPDATE messages SET state = :decision, updated_at = now() "
                "WHERE message_id = :mid AND state = 'held'"
            ),
            {"decision": decision, "mid": decided.message_id},
        )
        if dead_letter is not None:
            await insert_dead_letters(conn, [dead_letter], cipher)
        await audit.append(
            conn,
            [
                AuditEvent(actor, f"hold.{decision}", subject_id=hold_id, detail=reason),
                AuditEvent(
                    actor,
                    f"message.{decision}",
                    state=decision,
                    message_id=decided.message_id,
                    subject_id=hold_id,
                    detail=reason,
                ),
            ],
        )
        return True
