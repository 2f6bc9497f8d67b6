"""Dead letters, replays, parked records and holds: the SQL behind the operations desk.

Rules kept here (issue #6 cases 8, 11, 12, 14):
- an operator action takes effect once, whoever races it: a dead letter is claimed by one
  replay (`open` -> `replaying`), a hold is decided once (`open` -> `released` | `rejected`),
  a dead letter is discarded once; the loser of a race is told so, nothing is published twice;
- a replay re-queues a record under a publication of its own before that copy is published, and
  resets its retry budget; the copies published earlier are stale from then on; an interrupted
  replay resumes (lease) and publishes what is still pending — a replay whose publish fails is
  still running, never "done with nothing on the broker";
- replayed records go out in the order they were first accepted, not the order they failed;
- a rejected hold is a dead letter in the ledger first (the outbox publishes it);
- parked records continue, in order, under a continuation of their own once nothing earlier
  of their contract is open any more (the head delivered, or its dead letter discarded).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import audit
from ledger.crypto import PayloadCipher
from ledger.db import change, sql
from ledger.delivery import insert_dead_letters
from ledger.rows import Actor, AuditEvent, DeadLetterRow
from ledger.tables import accepting_sql
from schemas.states import (
    REPLAYABLE_REASONS,
    DeadLetterReason,
    MessageState,
    Publication,
    ReplayState,
    sql_values,
)

FILTER_KEYS = ("desk", "settlement_run_id", "contract_id", "reason", "status", "since", "until")

_DEAD_LETTER_COLUMNS = """
    d.dead_letter_id, d.message_id, d.desk, d.settlement_run_id, d.contract_id, d.reason,
    d.status, d.error_status, d.attempts, d.last_error, d.first_attempt_at, d.last_attempt_at,
    d.source_topic, d.source_partition, d.source_offset, d.created_at
"""
# Records of a contract parked behind this dead letter's record.
_PARKED_BEHIND = """
    (SELECT count(*) FROM messages p
      WHERE p.state = 'parked' AND d.message_id IS NOT NULL AND p.parked_behind = d.message_id
        AND d.status IN ('open', 'replaying')) AS parked
"""


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    desk: str | None = None
    settlement_run_id: str | None = None
    contract_id: str | None = None
    reason: str | None = None
    # the entry's status (`open`, …), or as a number the upstream's HTTP status in it
    status: str | int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses, params = ["TRUE"], {}
        for name in ("desk", "settlement_run_id", "contract_id", "reason", "status"):
            value = getattr(self, name)
            if value is not None:
                column = "error_status" if isinstance(value, int) else name
                clauses.append(f"d.{column} = :{name}")
                params[name] = value
        if self.since is not None:
            clauses.append("d.created_at >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append("d.created_at < :until")
            params["until"] = self.until
        return " AND ".join(clauses), params


def encode_cursor(created_at: datetime, dead_letter_id: str) -> str:
    raw = f"{created_at.isoformat()}|{dead_letter_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    moment, sep, dead_letter_id = raw.partition("|")
    if not sep:
        raise ValueError("malformed cursor")
    return datetime.fromisoformat(moment), dead_letter_id


async def list_dead_letters(
    engine: AsyncEngine, where: DeadLetterFilter, *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    clause, params = where.where()
    if cursor:
        after_at, after_id = decode_cursor(cursor)
        clause += " AND (d.created_at, d.dead_letter_id) > (:after_at, :after_id)"
        params.update(after_at=after_at, after_id=after_id)
    async with engine.connect() as conn:
        rows = await conn.execute(
            sql(
                f"SELECT {_DEAD_LETTER_COLUMNS}, {_PARKED_BEHIND} FROM dead_letters d "
                f"WHERE {clause} ORDER BY d.created_at, d.dead_letter_id LIMIT :limit"
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
                sql(
                    f"SELECT {_DEAD_LETTER_COLUMNS}, {_PARKED_BEHIND}, d.kafka_headers, "
                    "d.published_at, d.replay_id, d.closed_at, d.closed_by, d.close_reason "
                    "FROM dead_letters d WHERE d.dead_letter_id = :id"
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


_CANDIDATES = f"""
    SELECT d.dead_letter_id, d.message_id, d.desk, d.contract_id, d.reason, m.accept_seq
      FROM dead_letters d JOIN messages m ON m.message_id = d.message_id
     WHERE {{clause}} AND d.status = 'open'
       AND d.reason IN {sql_values(REPLAYABLE_REASONS)}
       AND m.state = 'dead_lettered' AND m.dead_letter_id = d.dead_letter_id
"""


async def replay_candidates(
    engine: AsyncEngine,
    *,
    message_ids: Sequence[str] | None,
    where: DeadLetterFilter | None,
    limit: int = 100_000,
) -> list[ReplayCandidate]:
    """Open, replayable dead letters — each record's current one — in the order their records
    were first accepted (which keeps every contract's order)."""
    clause, params = (where or DeadLetterFilter()).where()
    if message_ids is not None:
        clause += " AND d.message_id = ANY(CAST(:ids AS text[]))"
        params["ids"] = list(message_ids)
    async with engine.connect() as conn:
        rows = await conn.execute(
            sql(_CANDIDATES.format(clause=clause) + " ORDER BY m.accept_seq LIMIT :limit"),
            {**params, "limit": limit},
        )
        return [
            ReplayCandidate(r.dead_letter_id, r.message_id, r.desk, r.contract_id, r.reason)
            for r in rows
        ]


async def create_replay(
    engine: AsyncEngine,
    *,
    replay_id: str,
    reason: str,
    actor: Actor,
    candidates: Sequence[ReplayCandidate],
    needs_approval: Callable[[int, Collection[str]], bool],
) -> tuple[list[ReplayCandidate], bool]:
    """Claim the candidates' dead letters for this replay (those another replay took
    meanwhile are left out) and record it; returns what it holds and whether it needs a
    second operator (the operations rule `needs_approval` decides, on what was claimed).
    Nothing is recorded when nothing could be claimed."""
    async with change(engine) as conn:
        claimed = {
            r.dead_letter_id
            for r in await conn.execute(
                sql(
                    """
                    UPDATE dead_letters SET status = 'replaying', replay_id = :id
                     WHERE dead_letter_id = ANY(CAST(:ids AS text[])) AND status = 'open'
                    RETURNING dead_letter_id
                    """
                ),
                {"id": replay_id, "ids": [c.dead_letter_id for c in candidates]},
            )
        }
        items = [c for c in candidates if c.dead_letter_id in claimed]
        if not items:
            await conn.rollback()
            return [], False
        desks = sorted({i.desk for i in items})
        second_operator = needs_approval(len(items), desks)
        await conn.execute(
            sql(
                """
                INSERT INTO replays (replay_id, kind, state, reason, requested_by,
                                     requested_desk, item_count, desks)
                VALUES (:id, 'replay', :state, :reason, :by, :desk, :count,
                        CAST(:desks AS text[]))
                """
            ),
            {
                "id": replay_id,
                "state": ReplayState.PENDING_APPROVAL if second_operator else ReplayState.APPROVED,
                "reason": reason,
                "by": actor.name,
                "desk": actor.desk or "",
                "count": len(items),
                "desks": desks,
            },
        )
        await conn.execute(
            sql(
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
                    detail=f"{len(items)} dead letter(s) from {', '.join(desks)}; "
                    f"reason: {reason}; needs approval: {second_operator}",
                )
            ],
        )
    return items, second_operator


class Refused(Exception):
    """An operator action that cannot take effect: (HTTP-free) code and detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


async def approve_replay(
    engine: AsyncEngine,
    replay_id: str,
    actor: Actor,
    reason: str | None,
    same_operator: Callable[[str, str], bool],
) -> None:
    async with change(engine) as conn:
        row = (
            await conn.execute(
                sql("SELECT state, requested_by FROM replays WHERE replay_id = :id FOR UPDATE"),
                {"id": replay_id},
            )
        ).first()
        if row is None:
            raise Refused("not_found", "no such replay")
        if same_operator(row.requested_by, actor.name):
            raise Refused(
                "four_eyes",
                "a replay must be approved by a different operator than the one who requested it",
            )
        if row.state != ReplayState.PENDING_APPROVAL:
            raise Refused("not_pending", f"replay is {row.state}, not awaiting approval")
        await conn.execute(
            sql(
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
            sql(
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


async def renew_replay(engine: AsyncEngine, replay_id: str, lease_s: float) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sql(
                "UPDATE replays SET lease_until = now() + make_interval(secs => :lease) "
                "WHERE replay_id = :id AND state = 'running'"
            ),
            {"id": replay_id, "lease": lease_s},
        )


@dataclass(frozen=True, slots=True)
class OnLane:
    """A record as the ledger holds it, ready to be put on its lane again."""

    message_id: str
    dead_letter_id: str | None
    topic: str
    contract_id: str
    desk: str
    trader: str
    trace_id: str
    batch_id: str | None
    value: bytes
    replay_count: int


@dataclass(frozen=True, slots=True)
class Republish(OnLane):
    """One record to put back on its lane under a replay's (or continuation's) publication."""

    ord: int


async def requeue_chunk(
    engine: AsyncEngine,
    replay_id: str,
    kind: Publication,
    limit: int,
    cipher: PayloadCipher,
    actor: Actor,
) -> list[Republish]:
    """The next pending items of a replay, re-queued under its publication (a fresh retry
    budget), in acceptance order; items whose record moved on meanwhile are skipped."""
    came_from = MessageState.DEAD_LETTERED if kind is Publication.REPLAY else MessageState.PARKED
    async with engine.begin() as conn:
        items = (
            await conn.execute(
                sql(
                    """
                    SELECT ord, dead_letter_id, message_id FROM replay_items
                     WHERE replay_id = :id AND state = 'pending' ORDER BY ord LIMIT :limit
                    """
                ),
                {"id": replay_id, "limit": limit},
            )
        ).all()
        if not items:
            return []
        requeued = {
            r.message_id: r
            for r in await conn.execute(
                sql(
                    """
                    UPDATE messages m
                       SET state = 'queued', publication = :id, publication_kind = :kind,
                           queued_at = now(), attempts = 0, budget_used_s = 0,
                           first_attempt_at = NULL, lease_until = NULL, parked_behind = NULL,
                           updated_at = now()
                      FROM unnest(CAST(:mids AS text[]), CAST(:dls AS text[])) AS i(mid, dl)
                     WHERE m.message_id = i.mid
                       AND ((m.state = :came_from
                             AND (i.dl IS NULL OR m.dead_letter_id = i.dl))
                            OR (m.publication = :id AND m.state = 'queued'))
                    RETURNING m.message_id, m.topic, m.contract_id, m.desk, m.trader,
                              m.trace_id, m.batch_id, m.payload, m.payload_kid
                    """
                ),
                {
                    "id": replay_id,
                    "kind": str(kind),
                    "came_from": str(came_from),
                    "mids": [i.message_id for i in items],
                    "dls": [i.dead_letter_id for i in items],
                },
            )
        }
        skipped = [i.ord for i in items if i.message_id not in requeued]
        if skipped:
            await conn.execute(
                sql(
                    "UPDATE replay_items SET state = 'skipped' "
                    "WHERE replay_id = :id AND ord = ANY(CAST(:ords AS int[]))"
                ),
                {"id": replay_id, "ords": skipped},
            )
        counts = {
            r.message_id: int(r.n)
            for r in await conn.execute(
                sql(
                    """
                    SELECT message_id, count(*) AS n FROM replay_items
                     WHERE message_id = ANY(CAST(:mids AS text[])) AND state = 'published'
                     GROUP BY message_id
                    """
                ),
                {"mids": list(requeued)},
            )
        }
        await audit.append(
            conn,
            audit.state_events(
                actor, MessageState.QUEUED, list(requeued), detail=f"{kind} {replay_id}"
            ),
        )
    return [
        Republish(
            ord=i.ord,
            message_id=i.message_id,
            dead_letter_id=i.dead_letter_id,
            topic=(r := requeued[i.message_id]).topic,
            contract_id=r.contract_id,
            desk=r.desk,
            trader=r.trader,
            trace_id=r.trace_id,
            batch_id=r.batch_id,
            value=cipher.open(r.payload_kid, r.payload, i.message_id),
            replay_count=counts.get(i.message_id, 0) + 1,
        )
        for i in items
        if i.message_id in requeued
    ]


async def mark_republished(
    engine: AsyncEngine,
    replay_id: str,
    items: Sequence[Republish],
    actor: Actor,
    lease_s: float,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sql(
                """
                UPDATE replay_items SET state = 'published', published_at = now()
                 WHERE replay_id = :id AND ord = ANY(CAST(:ords AS int[]))
                """
            ),
            {"id": replay_id, "ords": [i.ord for i in items]},
        )
        await conn.execute(
            sql(
                "UPDATE dead_letters SET status = 'replayed' "
                "WHERE dead_letter_id = ANY(CAST(:ids AS text[])) AND status = 'replaying'"
            ),
            {"ids": [i.dead_letter_id for i in items if i.dead_letter_id]},
        )
        await conn.execute(
            sql(
                "UPDATE replays SET lease_until = now() + make_interval(secs => :lease) "
                "WHERE replay_id = :id AND state = 'running'"
            ),
            {"id": replay_id, "lease": lease_s},
        )
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "dead_letter.replayed" if i.dead_letter_id else "message.continued",
                    message_id=i.message_id,
                    subject_id=i.dead_letter_id or replay_id,
                    detail=f"publication {replay_id}",
                )
                for i in items
            ],
        )


@dataclass(frozen=True, slots=True)
class Stranded(OnLane):
    """A record the ledger holds as queued, to be put on its lane again under its live
    publication (the copy the broker had is gone)."""

    publication: str
    kind: Publication


async def ledger_now(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        now: datetime = (await conn.execute(sql("SELECT now()"))).scalar_one()
    return now


@dataclass
class Waited:
    """Queued records a worker's copies wait for: of these (desk, contract, lane topic), and
    none of `held` (copies the worker holds, so on the broker)."""

    lanes: set[tuple[str, str, str]] = field(default_factory=set)
    held: set[str] = field(default_factory=set)


async def queued_before(
    engine: AsyncEngine,
    cutoff: datetime,
    limit: int,
    cipher: PayloadCipher,
    waited: Waited | None = None,
) -> list[Stranded]:
    """Records queued before `cutoff` and still queued, in acceptance order; only those
    `waited` names when it is given."""
    of_contracts = ""
    params: dict[str, Any] = {"cutoff": cutoff, "limit": limit}
    if waited is not None:
        of_contracts = (
            " AND (desk, contract_id, topic) IN (SELECT d, c, t FROM unnest("
            "CAST(:desks AS text[]), CAST(:contracts AS text[]), CAST(:topics AS text[]))"
            " AS w(d, c, t))"
            " AND NOT message_id = ANY(CAST(:besides AS text[]))"
        )
        params["desks"] = [desk for desk, _, _ in waited.lanes]
        params["contracts"] = [contract for _, contract, _ in waited.lanes]
        params["topics"] = [topic for _, _, topic in waited.lanes]
        params["besides"] = list(waited.held)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sql(
                    f"""
                    WITH stranded AS (
                        SELECT message_id, topic, contract_id, desk, trader, trace_id,
                               batch_id, publication, publication_kind, dead_letter_id,
                               payload, payload_kid, accept_seq
                          FROM messages
                         WHERE state = 'queued' AND queued_at < :cutoff{of_contracts}
                           AND NOT {accepting_sql("messages")}
                         ORDER BY accept_seq LIMIT :limit
                    ), replayed AS (  -- replay_count, for copies of operators' replays only
                        SELECT message_id, count(*) AS n FROM replay_items
                         WHERE state = 'published' AND message_id IN (
                               SELECT message_id FROM stranded
                                WHERE publication_kind = 'replay')
                         GROUP BY message_id
                    )
                    SELECT s.*, coalesce(r.n, 0) AS replays
                      FROM stranded s LEFT JOIN replayed r USING (message_id)
                     ORDER BY s.accept_seq
                    """
                ),
                params,
            )
        ).all()
    return [
        Stranded(
            message_id=r.message_id,
            topic=r.topic,
            contract_id=r.contract_id,
            desk=r.desk,
            trader=r.trader,
            trace_id=r.trace_id,
            batch_id=r.batch_id,
            publication=r.publication,
            kind=Publication(r.publication_kind),
            dead_letter_id=r.dead_letter_id,
            replay_count=int(r.replays),
            value=cipher.open(r.payload_kid, r.payload, r.message_id),
        )
        for r in rows
    ]


async def record_restored(
    engine: AsyncEngine, restored: Sequence[Stranded], actor: Actor, why: str
) -> None:
    async with engine.begin() as conn:
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "message.republished",
                    message_id=r.message_id,
                    subject_id=r.publication,
                    detail=why,
                )
                for r in restored
            ],
        )


async def finish_replay(engine: AsyncEngine, replay_id: str, actor: Actor) -> None:
    async with engine.begin() as conn:
        done = await conn.execute(
            sql(
                "UPDATE replays SET state = 'completed', completed_at = now(), "
                "lease_until = NULL WHERE replay_id = :id AND state = 'running' RETURNING kind"
            ),
            {"id": replay_id},
        )
        row = done.first()
        if row is not None:
            await audit.append(
                conn, [AuditEvent(actor, f"{row.kind}.completed", subject_id=replay_id)]
            )


async def get_replay(engine: AsyncEngine, replay_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sql("SELECT * FROM replays WHERE replay_id = :id"), {"id": replay_id}
            )
        ).first()
        if row is None:
            return None
        grouped = await conn.execute(
            sql("SELECT state, count(*) FROM replay_items WHERE replay_id = :id GROUP BY state"),
            {"id": replay_id},
        )
        counts: dict[str, int] = {state: n for state, n in grouped}  # noqa: C416 - typed rows
        outcome = await conn.execute(
            sql(
                """
                SELECT m.state, count(*) FROM replay_items i JOIN messages m USING (message_id)
                 WHERE i.replay_id = :id GROUP BY m.state
                """
            ),
            {"id": replay_id},
        )
        result = dict(row._mapping)
        result["progress"] = {
            "published": counts.get("published", 0),
            "pending": counts.get("pending", 0),
        }
        result["outcome"] = {state: int(n) for state, n in outcome}
        return result


async def list_replays(
    engine: AsyncEngine, state: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Replays (and continuations of parked records), newest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sql(
                "SELECT replay_id, kind, state, item_count, reason, requested_by, approved_by, "
                "created_at, completed_at FROM replays "
                "WHERE CAST(:state AS text) IS NULL OR state = :state "
                "ORDER BY created_at DESC, replay_id LIMIT :limit"
            ),
            {"state": state, "limit": limit},
        )
        return [dict(r._mapping) for r in rows]


async def runnable_replays(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sql(
                "SELECT replay_id FROM replays WHERE state = 'approved' OR (state = 'running' "
                "AND (lease_until IS NULL OR lease_until < now())) ORDER BY created_at"
            )
        )
        return [r.replay_id for r in rows]


# -- parked records continue ------------------------------------------------------------------


# Parked records with nothing earlier of their contract open any more (read through the
# partial index `messages_parked`, migration 0008: never the whole table).
_RUNNABLE_PARKED = """
    SELECT p.message_id FROM messages p
     WHERE p.state = 'parked'
       AND NOT EXISTS (
           SELECT 1 FROM messages q
             LEFT JOIN dead_letters d ON d.dead_letter_id = q.dead_letter_id
            WHERE q.desk = p.desk AND q.contract_id = p.contract_id
              AND q.accept_seq < p.accept_seq
              AND ((q.state = 'dead_lettered'
                    AND d.status IN ('open', 'replaying'))
                   OR (q.state IN ('queued', 'delivering')
                       AND q.publication_kind = 'replay')))
     ORDER BY p.accept_seq
     LIMIT 5000
     FOR UPDATE OF p SKIP LOCKED
"""


async def continue_parked(engine: AsyncEngine, job_id: str, actor: Actor) -> int:
    """Parked records with nothing earlier of their contract open any more (no open dead
    letter, no replay in progress) go on under a continuation of their own; returns how many."""
    async with change(engine) as conn:
        rows = (await conn.execute(sql(_RUNNABLE_PARKED))).all()
        if not rows:
            return 0
        ids = [r.message_id for r in rows]
        await conn.execute(
            sql(
                """
                INSERT INTO replays (replay_id, kind, state, reason, requested_by,
                                     requested_desk, item_count, desks)
                SELECT :id, 'continuation', 'approved',
                       'nothing earlier of their contract is open any more', :by, '',
                       :count, array_agg(DISTINCT desk)
                  FROM messages WHERE message_id = ANY(CAST(:ids AS text[]))
                """
            ),
            {"id": job_id, "by": actor.name, "count": len(ids), "ids": ids},
        )
        await conn.execute(
            sql(
                """
                INSERT INTO replay_items (replay_id, ord, message_id)
                SELECT :id, ord, message_id
                  FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS t(message_id, ord)
                """
            ),
            {"id": job_id, "ids": ids},
        )
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "continuation.requested",
                    subject_id=job_id,
                    detail=f"{len(ids)} parked record(s) continue",
                )
            ],
        )
        return len(ids)


# -- discard ----------------------------------------------------------------------------------


async def discard(
    engine: AsyncEngine, dead_letter_id: str, actor: Actor, reason: str
) -> dict[str, Any]:
    """Close an open dead letter without delivery (its record stays dead-lettered)."""
    async with change(engine) as conn:
        row = (
            await conn.execute(
                sql(
                    """
                    UPDATE dead_letters
                       SET status = 'discarded', closed_at = now(), closed_by = :by,
                           close_reason = :reason
                     WHERE dead_letter_id = :id AND status = 'open'
                    RETURNING dead_letter_id, message_id
                    """
                ),
                {"id": dead_letter_id, "by": actor.name, "reason": reason},
            )
        ).first()
        if row is None:
            status = await conn.scalar(
                sql("SELECT status FROM dead_letters WHERE dead_letter_id = :id"),
                {"id": dead_letter_id},
            )
            if status is None:
                raise Refused("not_found", "no such dead letter")
            raise Refused("not_open", f"dead letter is {status}, not open")
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "dead_letter.discarded",
                    message_id=row.message_id,
                    subject_id=dead_letter_id,
                    detail=reason,
                )
            ],
        )
        return dict(row._mapping)


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
            sql(
                f"""
                SELECT hold_id, message_id, desk, contract_id, submitted_position_mwh,
                       reconciled_position_mwh, variance, reason, state, created_at,
                       decided_at, decided_by, decision_reason
                  FROM holds WHERE {" AND ".join(clauses)}
                 ORDER BY created_at LIMIT :limit
                """
            ),
            params,
        )
        return [dict(r._mapping) for r in rows]


async def decide_hold(
    engine: AsyncEngine,
    hold_id: str,
    decision: str,
    actor: Actor,
    reason: str,
    cipher: PayloadCipher,
    new_dead_letter_id: str,
    seal: Callable[[bytes, dict[str, str]], bytes],
) -> dict[str, Any]:
    """`released` or `rejected`, once; a rejection is a `drift_rejected` dead letter in the
    same transaction (published by the outbox afterwards), signed (and sealed) by
    `seal` as the intake puts records on the lanes."""
    async with change(engine) as conn:
        hold = (
            await conn.execute(
                sql(
                    """
                    UPDATE holds SET state = :decision, decided_at = now(), decided_by = :by,
                           decision_reason = :reason
                     WHERE hold_id = :id AND state = 'open'
                    RETURNING hold_id, message_id, desk, contract_id, submitted_position_mwh,
                              reconciled_position_mwh, variance
                    """
                ),
                {"decision": decision, "by": actor.name, "reason": reason, "id": hold_id},
            )
        ).first()
        if hold is None:
            state = await conn.scalar(
                sql("SELECT state FROM holds WHERE hold_id = :id"), {"id": hold_id}
            )
            if state is None:
                raise Refused("not_found", "no such hold")
            raise Refused("already_decided", f"hold is already {state}")
        message = (
            await conn.execute(
                sql(
                    """
                    UPDATE messages SET state = :decision, updated_at = now(),
                           dead_letter_id = CASE WHEN :decision = 'rejected' THEN :dl
                                                 ELSE dead_letter_id END
                     WHERE message_id = :mid AND state = 'held'
                    RETURNING message_id, settlement_run_id, trader, trace_id, batch_id, topic,
                              source_partition, source_offset, attempts, first_attempt_at,
                              last_attempt_at, payload, payload_kid
                    """
                ),
                {"decision": decision, "mid": hold.message_id, "dl": new_dead_letter_id},
            )
        ).first()
        dead_letter_id = None
        if decision == "rejected" and message is not None:
            dead_letter_id = new_dead_letter_id
            row = _drift_rejection(hold, message, reason, new_dead_letter_id, cipher, seal)
            await insert_dead_letters(conn, [row], cipher)
        await audit.append(
            conn,
            [
                AuditEvent(actor, f"hold.{decision}", subject_id=hold_id, detail=reason),
                AuditEvent(
                    actor,
                    f"message.{decision}",
                    state=decision,
                    message_id=hold.message_id,
                    subject_id=hold_id,
                    detail=reason,
                ),
            ],
        )
        return {
            "hold_id": hold_id,
            "message_id": hold.message_id,
            "state": decision,
            "dead_letter_id": dead_letter_id,
        }


def _num(value: Decimal | None) -> str:
    return "unknown" if value is None else f"{value:f}"


def _drift_rejection(
    hold: Any,
    message: Any,
    reason: str,
    dead_letter_id: str,
    cipher: PayloadCipher,
    seal: Callable[[bytes, dict[str, str]], bytes],
) -> DeadLetterRow:
    identity = {
        "message_id": hold.message_id,
        "desk": hold.desk,
        "trader": message.trader,
        "trace_id": message.trace_id,
        "schema_version": "1",
    }
    if message.batch_id:
        identity["batch_id"] = message.batch_id
    # The rejected record goes to the reconciliation topic as a lane would carry it: signed,
    # and sealed when lane encryption is on.
    value = seal(cipher.open(message.payload_kid, message.payload, hold.message_id), identity)
    return DeadLetterRow(
        dead_letter_id=dead_letter_id,
        dedupe_key=f"hold:{hold.hold_id}",
        reason=DeadLetterReason.DRIFT_REJECTED,
        error_status=None,
        attempts=message.attempts,
        last_error=(
            f"reconciled {_num(hold.reconciled_position_mwh)} vs submitted "
            f"{_num(hold.submitted_position_mwh)} (variance {_num(hold.variance)}); "
            f"rejected: {reason}"
        ),
        first_attempt_at=message.first_attempt_at,
        last_attempt_at=message.last_attempt_at,
        source_topic=message.topic,
        source_partition=message.source_partition or 0,
        source_offset=message.source_offset or 0,
        kafka_key=hold.contract_id.encode(),
        kafka_value=value,
        headers=[(k, v.encode()) for k, v in identity.items()],
        message_id=hold.message_id,
        desk=hold.desk,
        settlement_run_id=message.settlement_run_id,
        contract_id=hold.contract_id,
    )
