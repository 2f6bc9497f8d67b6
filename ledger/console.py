"""What the operations console reads besides the API's own reads: the overview, search across
ids, a record's attempts and audit rows, and replays. Operators see every desk; nothing here
changes state (changes go through operations.service, as the API's do)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import reconciliation as recon
from ledger.db import sql
from ledger.reads import OLDEST_UNDELIVERED_S
from ledger.tables import accepting_sql
from schemas.states import MessageState, sql_values

_HIDDEN = sql_values(frozenset({MessageState.PENDING, MessageState.ABORTED}))
_OUTCOMES = frozenset({"delivered", "held", "dead_lettered"})


@dataclass(frozen=True, slots=True)
class Overview:
    by_desk: dict[str, dict[str, int]]  # desk -> state -> records
    by_lane: dict[str, dict[str, int]]  # topic -> state -> records
    hours: list[dict[str, Any]]  # last 24 h: {hour, accepted, delivered, held, dead_lettered}
    oldest_undelivered_s: float
    open_dead_letters: int
    open_holds: int
    pending_replays: int


@dataclass(frozen=True, slots=True)
class Hit:
    kind: str  # message, batch
    message_id: str | None
    batch_id: str | None
    desk: str
    contract_id: str | None
    settlement_run_id: str
    state: str
    trace_id: str
    created_at: datetime


class ConsoleReads:
    def __init__(self, engine: AsyncEngine, *, timeout_s: float | None = None) -> None:
        self.engine = engine
        # Every read gives up after this long (TimeoutError: the database is away, a 503).
        self.timeout_s = timeout_s

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with asyncio.timeout(self.timeout_s), self.engine.connect() as conn:
            yield conn

    async def overview(self) -> Overview:
        async with self._connect() as conn:
            counts = await conn.execute(
                sql(
                    f"SELECT desk, topic, state, count(*) FROM messages "
                    f"WHERE state NOT IN {_HIDDEN} GROUP BY desk, topic, state"
                )
            )
            by_desk: dict[str, dict[str, int]] = {}
            by_lane: dict[str, dict[str, int]] = {}
            for desk, topic, state, n in counts:
                by_desk.setdefault(desk, {}).setdefault(state, 0)
                by_desk[desk][state] += int(n)
                by_lane.setdefault(topic, {}).setdefault(state, 0)
                by_lane[topic][state] += int(n)
            hours = await conn.execute(
                sql(
                    f"""
                    SELECT date_trunc('hour', ts) AS hour,
                           count(*) FILTER (WHERE what = 'accepted'),
                           count(*) FILTER (WHERE what = 'delivered'),
                           count(*) FILTER (WHERE what = 'held'),
                           count(*) FILTER (WHERE what = 'dead_lettered')
                      FROM (
                        SELECT created_at AS ts, 'accepted' AS what FROM messages
                         WHERE created_at >= now() - interval '24 hours'
                           AND state NOT IN {_HIDDEN}
                        UNION ALL
                        SELECT final_at, state FROM messages
                         WHERE final_at >= now() - interval '24 hours'
                           AND state IN {sql_values(_OUTCOMES)}
                      ) e
                     GROUP BY 1 ORDER BY 1
                    """
                )
            )
            hourly = [
                {
                    "hour": hour,
                    "accepted": int(a),
                    "delivered": int(d),
                    "held": int(h),
                    "dead_lettered": int(x),
                }
                for hour, a, d, h, x in hours
            ]
            row = (
                await conn.execute(
                    sql(
                        "SELECT (SELECT count(*) FROM holds WHERE state = 'open'), "
                        "(SELECT count(*) FROM dead_letters WHERE status = 'open'), "
                        "(SELECT count(*) FROM replays WHERE state = 'pending_approval'), "
                        f"({OLDEST_UNDELIVERED_S})"
                    )
                )
            ).one()
        return Overview(
            by_desk=by_desk,
            by_lane=by_lane,
            hours=hourly,
            oldest_undelivered_s=max(0.0, float(row[3])),
            open_dead_letters=int(row[1]),
            open_holds=int(row[0]),
            pending_replays=int(row[2]),
        )

    async def search(self, term: str, *, limit: int = 100) -> list[Hit]:
        """Records whose message id, batch id, contract id, settlement run id or trace id is
        `term` (exact; a contract id may also be a prefix ending in `*`)."""
        term = term.strip()
        if not term:
            return []
        prefix = term[:-1] if term.endswith("*") else None
        async with self._connect() as conn:
            rows = await conn.execute(
                sql(
                    f"""
                    SELECT message_id, batch_id, desk, contract_id, settlement_run_id, state,
                           trace_id, created_at
                      FROM messages
                     WHERE state NOT IN {_HIDDEN} AND NOT {accepting_sql("messages")}
                       AND (message_id = :t OR batch_id = :t OR contract_id = :t
                            OR settlement_run_id = :t OR trace_id = :t
                            OR (CAST(:p AS text) IS NOT NULL
                                AND contract_id LIKE replace(replace(:p, '%', '\\%'), '_', '\\_')
                                                     || '%'))
                     ORDER BY created_at DESC, message_id LIMIT :limit
                    """
                ),
                {"t": term, "p": prefix, "limit": limit},
            )
            return [
                Hit(
                    "message",
                    r.message_id,
                    r.batch_id,
                    r.desk,
                    r.contract_id,
                    r.settlement_run_id,
                    r.state,
                    r.trace_id,
                    r.created_at,
                )
                for r in rows
            ]

    async def audit_rows(self, message_id: str, batch_id: str | None) -> list[dict[str, Any]]:
        """Every audit row about a record (its attempts and outcomes, operators' decisions) and
        the acceptance of the request that queued it, in chain order."""
        async with self._connect() as conn:
            rows = await conn.execute(
                sql(
                    """
                    SELECT id, seq, at, actor_kind, actor, action, state, detail, hash
                      FROM audit_log
                     WHERE message_id = :id
                        OR (CAST(:batch AS text) IS NOT NULL AND batch_id = :batch
                            AND action = 'batch.accepted')
                     ORDER BY id LIMIT 1000
                    """
                ),
                {"id": message_id, "batch": batch_id},
            )
            return [dict(r._mapping) for r in rows]

    async def replays(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        async with asyncio.timeout(self.timeout_s):
            return await recon.list_replays(self.engine, state, limit)

    async def replay_items(self, replay_id: str, limit: int = 500) -> list[dict[str, Any]]:
        async with self._connect() as conn:
            rows = await conn.execute(
                sql(
                    """
                    SELECT i.ord, i.message_id, i.dead_letter_id, i.state AS item_state,
                           m.state, m.desk, m.contract_id
                      FROM replay_items i LEFT JOIN messages m USING (message_id)
                     WHERE i.replay_id = :id ORDER BY i.ord LIMIT :limit
                    """
                ),
                {"id": replay_id, "limit": limit},
            )
            return [dict(r._mapping) for r in rows]
