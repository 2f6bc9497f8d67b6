"""What desks and operators read about batches and records. A request that was not answered
202 (pending or aborted) does not exist for a reader (CONTRACT §3)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import fetch_direct, sql
from ledger.tables import accepting_sql
from schemas.states import MessageState, sql_values

_HIDDEN = sql_values(frozenset({MessageState.PENDING, MessageState.ABORTED}))


@dataclass(frozen=True, slots=True)
class BatchRecord:
    index: int
    message_id: str
    state: MessageState
    contract_id: str


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    desk: str
    settlement_run_id: str
    created_at: datetime
    records: list[BatchRecord]


@dataclass(frozen=True, slots=True)
class HistoryRow:
    state: str
    at: datetime
    detail: str | None


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    batch_id: str | None
    desk: str
    settlement_run_id: str
    contract_id: str
    revision: int
    state: MessageState
    attempts: int
    upstream_transaction_id: str | None
    last_error: str | None
    trace_id: str
    dead_letter_id: str | None
    parked_behind_dead_letter: str | None
    history: list[HistoryRow]


# One statement, one round trip: under another desk's big batches each round trip waits for a
# busy database's CPU (measured: ~1.3 ms idle, ~11 ms at p50 for the two statements this used
# to be). Each record's state is looked up by its message id (the LATERAL subquery, kept apart
# by OFFSET 0 so that the planner cannot fold it into a join): the rows a batch id matches are
# estimated from statistics of all batches, ~1,000 a batch while 5,000-record batches arrive,
# and for that many the planner scanned a whole table instead (all of `batch_messages`, in
# parallel, in one bench run while one desk sent 5,000-record batches: 150 of 2,000 reads of
# another desk's one-record batch took 5-28 ms in the executor against 0.03 ms at p50; all of
# `messages` into a hash join on a copy with such statistics, where this statement reads one
# record in 0.1 ms instead of 18, and 5,000 in 7 ms instead of 26).
BATCH_READ = """
    SELECT b.batch_id, b.desk, b.settlement_run_id, b.created_at,
           r.idx, r.message_id, r.state, r.contract_id
      FROM batches b
      LEFT JOIN LATERAL (
            SELECT l.idx, l.message_id, m.state, m.contract_id
              FROM batch_messages l
             CROSS JOIN LATERAL (SELECT state, contract_id FROM messages
                                  WHERE message_id = l.message_id OFFSET 0) m
             WHERE l.batch_id = b.batch_id) r ON true
     WHERE b.batch_id = :id AND b.state = 'accepted'
       AND (CAST(:desk AS text) IS NULL OR b.desk = :desk)
     ORDER BY r.idx
"""


async def get_batch(engine: AsyncEngine, batch_id: str, desk: str | None) -> Batch | None:
    """An accepted batch; `desk` limits it to that desk's batches (None: any desk), in the same
    query, so "not yours" and "does not exist" take the same path (BATCH_READ)."""
    rows = await fetch_direct(engine, BATCH_READ, {"id": batch_id, "desk": desk})
    if not rows:
        return None
    first = rows[0]
    records = [
        BatchRecord(r["idx"], r["message_id"], MessageState(r["state"]), r["contract_id"])
        for r in rows
        if r["message_id"] is not None
    ]
    return Batch(
        first["batch_id"], first["desk"], first["settlement_run_id"], first["created_at"], records
    )


async def get_message(engine: AsyncEngine, message_id: str, desk: str | None) -> Message | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sql(
                    f"""
                    SELECT m.message_id, m.batch_id, m.desk, m.settlement_run_id,
                           m.contract_id, m.revision, m.state, m.attempts,
                           m.upstream_transaction_id, m.last_error, m.trace_id,
                           m.dead_letter_id,
                           CASE WHEN m.state = 'parked' THEN h.dead_letter_id END AS behind
                      FROM messages m LEFT JOIN messages h ON h.message_id = m.parked_behind
                     WHERE m.message_id = :id AND m.state NOT IN {_HIDDEN}
                       AND NOT {accepting_sql("m")}
                       AND (CAST(:desk AS text) IS NULL OR m.desk = :desk)
                    """
                ),
                {"id": message_id, "desk": desk},
            )
        ).first()
        if row is None:
            return None
        # The record's own events, and the acceptance of the request that queued it.
        events = await conn.execute(
            sql(
                """
                SELECT state, at, detail FROM (
                    SELECT id, state, at, detail FROM audit_log
                     WHERE message_id = :id AND state IS NOT NULL
                    UNION ALL
                    SELECT id, 'queued', at, detail FROM audit_log
                     WHERE batch_id = :batch AND action = 'batch.accepted'
                ) h ORDER BY id
                """
            ),
            {"id": message_id, "batch": row.batch_id},
        )
        history = [HistoryRow(s, at, d) for s, at, d in events]
    return Message(
        row.message_id,
        row.batch_id,
        row.desk,
        row.settlement_run_id,
        row.contract_id,
        row.revision,
        MessageState(row.state),
        row.attempts,
        row.upstream_transaction_id,
        row.last_error,
        row.trace_id,
        row.dead_letter_id,
        row.behind,
        history,
    )


@dataclass(frozen=True, slots=True)
class OpenWork:
    holds: int  # awaiting review
    dead_letters: int  # not yet replayed or discarded
    oldest_undelivered_s: float  # age of the oldest record still queued or delivering; 0 if none


_UNDELIVERED = sql_values(frozenset({MessageState.QUEUED, MessageState.DELIVERING}))
# Seconds since the oldest record still queued or delivering was accepted (0 if none): read
# through `messages_contract_open`, whose predicate (every open state) this one implies.
OLDEST_UNDELIVERED_S = (
    "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) "
    f"FROM messages WHERE state IN {_UNDELIVERED}"
)


async def open_work(engine: AsyncEngine) -> OpenWork:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sql(
                    "SELECT (SELECT count(*) FROM holds WHERE state = 'open'), "
                    "(SELECT count(*) FROM dead_letters WHERE status = 'open'), "
                    f"({OLDEST_UNDELIVERED_S})"
                )
            )
        ).one()
        return OpenWork(int(row[0]), int(row[1]), max(0.0, float(row[2])))


async def ping(engine: AsyncEngine) -> None:
    # On its own connection, dropped if the answer does not come (`fetch_direct`).
    await fetch_direct(engine, "SELECT 1", {})
