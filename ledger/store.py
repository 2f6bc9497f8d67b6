"""The ledger: every SQL statement the intake and the workers run.

Rules kept here:
- an Idempotency-Key is taken with a lease, so a request whose process died can be retried once
  the lease runs out, and released again when the broker did not acknowledge;
- a message row is created by whichever side sees it first (intake after the broker's ack, or a
  worker consuming it) and never overwritten by the other;
- a worker claims a whole polled batch in one statement, and writes outcomes in one statement per
  flush, never one round trip per message.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import audit
from ledger.audit import Actor
from ledger.crypto import PayloadCipher

FINAL_STATES = frozenset(
    {"delivered", "held", "dead_lettered", "superseded", "released", "rejected"}
)
# States in which the upstream has taken the record into its books: a lower revision of the
# same identity must never be sent after one of these.
ACCEPTED_UPSTREAM = ("delivered", "held", "released", "rejected")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- intake: idempotency keys -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExistingKey:
    state: str
    request_hash: str
    resource_kind: str | None
    resource_id: str | None
    status_url: str | None


async def take_idempotency_key(
    engine: AsyncEngine, desk: str, key: str, request_hash: str, lease_s: float
) -> ExistingKey | None:
    """None when this request now holds the key; else what already holds it."""
    async with engine.begin() as conn:
        taken = await conn.execute(
            text(
                """
                INSERT INTO idempotency_keys (desk, key, request_hash, state, lease_until)
                VALUES (:desk, :key, :hash, 'in_flight', now() + make_interval(secs => :lease))
                ON CONFLICT (desk, key) DO UPDATE
                   SET request_hash = EXCLUDED.request_hash,
                       lease_until = EXCLUDED.lease_until,
                       created_at = now()
                 WHERE idempotency_keys.state = 'in_flight'
                   AND idempotency_keys.lease_until < now()
                RETURNING 1
                """
            ),
            {"desk": desk, "key": key, "hash": request_hash, "lease": lease_s},
        )
        if taken.first() is not None:
            return None
        row = (
            await conn.execute(
                text(
                    "SELECT state, request_hash, resource_kind, resource_id, status_url "
                    "FROM idempotency_keys WHERE desk = :desk AND key = :key"
                ),
                {"desk": desk, "key": key},
            )
        ).one()
    return ExistingKey(*row)


async def release_idempotency_key(
    engine: AsyncEngine, desk: str, key: str, request_hash: str
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "DELETE FROM idempotency_keys WHERE desk = :desk AND key = :key "
                "AND state = 'in_flight' AND request_hash = :hash"
            ),
            {"desk": desk, "key": key, "hash": request_hash},
        )


# -- intake: revision conflicts and acceptance ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    index: int
    message_id: str
    identity: str
    contract_id: str
    market: str
    revision: int
    topic: str
    position_mwh: str
    value: bytes


async def revision_conflicts(
    engine: AsyncEngine, messages: Sequence[AcceptedMessage]
) -> list[tuple[AcceptedMessage, str]]:
    """Records whose identity and revision already exist with other content."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                """
                SELECT i.ord, m.message_id
                  FROM unnest(CAST(:identities AS text[]), CAST(:revisions AS int[]),
                              CAST(:ids AS text[])) WITH ORDINALITY
                       AS i(identity_hash, revision, message_id, ord)
                  JOIN messages m ON m.identity_hash = i.identity_hash
                                 AND m.revision = i.revision
                                 AND m.message_id <> i.message_id
                """
            ),
            {
                "identities": [m.identity for m in messages],
                "revisions": [m.revision for m in messages],
                "ids": [m.message_id for m in messages],
            },
        )
        return [(messages[ord_ - 1], existing) for ord_, existing in rows]


async def record_acceptance(
    engine: AsyncEngine,
    *,
    batch_id: str,
    desk: str,
    trader: str,
    settlement_run_id: str,
    idempotency_key: str,
    request_hash: str,
    trace_id: str,
    resource_kind: str,
    resource_id: str,
    status_url: str,
    messages: Sequence[AcceptedMessage],
    actor: Actor,
    cipher: PayloadCipher,
) -> None:
    """After the broker acknowledged every record: the batch, its messages, the key completed."""
    unique = {m.message_id: m for m in messages}
    async with engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO batches (batch_id, desk, trader, settlement_run_id, idempotency_key,
                                     record_count, trace_id)
                VALUES (:batch_id, :desk, :trader, :run, :key, :count, :trace)
                """
            ),
            {
                "batch_id": batch_id,
                "desk": desk,
                "trader": trader,
                "run": settlement_run_id,
                "key": idempotency_key,
                "count": len(messages),
                "trace": trace_id,
            },
        )
        await conn.execute(
            text(
                """
                INSERT INTO batch_messages (batch_id, idx, message_id)
                SELECT :batch_id, idx, message_id
                  FROM unnest(CAST(:idx AS int[]), CAST(:ids AS text[])) AS t(idx, message_id)
                """
            ),
            {
                "batch_id": batch_id,
                "idx": [m.index for m in messages],
                "ids": [m.message_id for m in messages],
            },
        )
        inserted = await conn.execute(
            text(
                """
                INSERT INTO messages (message_id, desk, trader, batch_id, settlement_run_id,
                        contract_id, market, identity_hash, revision, topic, state,
                        submitted_position_mwh, payload, payload_kid, trace_id)
                    SELECT t.message_id, :desk, :trader, :batch_id, :run, t.contract_id, t.market,
                           t.identity_hash, t.revision, t.topic, 'queued', t.position, t.payload,
                           :kid, :trace
                      FROM unnest(CAST(:ids AS text[]), CAST(:contracts AS text[]),
                                  CAST(:markets AS text[]), CAST(:identities AS text[]),
                                  CAST(:revisions AS int[]), CAST(:topics AS text[]),
                                  CAST(:positions AS numeric[]), CAST(:payloads AS bytea[]))
                           AS t(message_id, contract_id, market, identity_hash, revision, topic,
                                position, payload)
                    ON CONFLICT DO NOTHING
                    RETURNING message_id
                """
            ),
            {
                "desk": desk,
                "trader": trader,
                "batch_id": batch_id,
                "run": settlement_run_id,
                "trace": trace_id,
                "ids": list(unique),
                "contracts": [m.contract_id for m in unique.values()],
                "markets": [m.market for m in unique.values()],
                "identities": [m.identity for m in unique.values()],
                "revisions": [m.revision for m in unique.values()],
                "topics": [m.topic for m in unique.values()],
                "positions": [Decimal(m.position_mwh) for m in unique.values()],
                "payloads": [cipher.seal(m.value, m.message_id) for m in unique.values()],
                "kid": cipher.active_kid,
            },
        )
        new_ids = [row.message_id for row in inserted]
        await audit.append(
            conn, audit.state_events(actor, "queued", new_ids, batch_id=batch_id, detail="accepted")
        )
        await conn.execute(
            text(
                """
                UPDATE idempotency_keys
                   SET state = 'completed', resource_kind = :kind, resource_id = :rid,
                       status_url = :url, completed_at = now()
                 WHERE desk = :desk AND key = :key AND request_hash = :hash
                """
            ),
            {
                "kind": resource_kind,
                "rid": resource_id,
                "url": status_url,
                "desk": desk,
                "key": idempotency_key,
                "hash": request_hash,
            },
        )


# -- reads ----------------------------------------------------------------------------------------


async def get_batch(engine: AsyncEngine, batch_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        batch = (
            await conn.execute(
                text(
                    "SELECT batch_id, desk, settlement_run_id, created_at FROM batches "
                    "WHERE batch_id = :id"
                ),
                {"id": batch_id},
            )
        ).first()
        if batch is None:
            return None
        rows = await conn.execute(
            text(
                """
                SELECT b.idx, b.message_id, coalesce(m.state, 'queued'), m.contract_id
                  FROM batch_messages b LEFT JOIN messages m USING (message_id)
                 WHERE b.batch_id = :id ORDER BY b.idx
                """
            ),
            {"id": batch_id},
        )
        return {
            "batch_id": batch.batch_id,
            "desk": batch.desk,
            "settlement_run_id": batch.settlement_run_id,
            "created_at": batch.created_at,
            "messages": [
                {"index": idx, "message_id": mid, "state": state, "contract_id": contract}
                for idx, mid, state, contract in rows
            ],
        }


async def get_message(engine: AsyncEngine, message_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    """
                    SELECT message_id, batch_id, desk, contract_id, revision, state, attempts,
                           upstream_transaction_id, last_error, settlement_run_id, trace_id
                      FROM messages WHERE message_id = :id
                    """
                ),
                {"id": message_id},
            )
        ).first()
        if row is None:
            return None
        events = await conn.execute(
            text(
                "SELECT state, at, detail FROM audit_log WHERE message_id = :id "
                "AND state IS NOT NULL ORDER BY seq"
            ),
            {"id": message_id},
        )
        result = dict(row._mapping)
        result["history"] = [{"state": s, "at": at, "detail": d} for s, at, d in events]
        return result


async def open_work(engine: AsyncEngine) -> tuple[int, int]:
    """Holds awaiting review and dead letters not yet replayed."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM holds WHERE state = 'open'), "
                    "(SELECT count(*) FROM dead_letters WHERE status = 'open')"
                )
            )
        ).one()
        return int(row[0]), int(row[1])


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


# -- worker: claim, outcomes, dead letters, holds -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    """A consumed message with trusted (signature-verified) headers."""

    message_id: str
    desk: str
    trader: str
    batch_id: str | None
    settlement_run_id: str
    contract_id: str
    market: str
    identity: str
    revision: int
    topic: str
    position_mwh: Decimal
    value: bytes
    trace_id: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Claim:
    """What the ledger says about a consumed message before it is forwarded."""

    status: str  # 'claimed' (deliver it), 'final' (already done), 'conflict'
    state: str
    attempts: int
    first_attempt_at: datetime | None
    max_accepted_revision: int | None


async def claim_batch(
    engine: AsyncEngine, batch: Sequence[Incoming], actor: Actor, cipher: PayloadCipher
) -> dict[str, Claim]:
    """Insert unseen messages as `delivering`, move queued/delivering ones to `delivering`,
    and report final ones — one statement for the whole polled batch."""
    unique = {m.message_id: m for m in batch}
    rows = list(unique.values())
    async with engine.begin() as conn:
        result = await conn.execute(
            text(
                f"""
                WITH incoming AS (
                    SELECT * FROM unnest(
                        CAST(:ids AS text[]), CAST(:desks AS text[]), CAST(:traders AS text[]),
                        CAST(:batches AS text[]), CAST(:runs AS text[]),
                        CAST(:contracts AS text[]), CAST(:markets AS text[]),
                        CAST(:identities AS text[]), CAST(:revisions AS int[]),
                        CAST(:topics AS text[]), CAST(:positions AS numeric[]),
                        CAST(:payloads AS bytea[]), CAST(:traces AS text[]),
                        CAST(:partitions AS int[]), CAST(:offsets AS bigint[]))
                    AS t(message_id, desk, trader, batch_id, settlement_run_id, contract_id,
                         market, identity_hash, revision, topic, position, payload, trace_id,
                         source_partition, source_offset)
                ),
                ins AS (
                    INSERT INTO messages (message_id, desk, trader, batch_id, settlement_run_id,
                        contract_id, market, identity_hash, revision, topic, state,
                        submitted_position_mwh, payload, payload_kid, trace_id,
                        source_partition, source_offset)
                    SELECT message_id, desk, trader, batch_id, settlement_run_id, contract_id,
                           market, identity_hash, revision, topic, 'delivering', position,
                           payload, :kid, trace_id, source_partition, source_offset
                      FROM incoming
                    ON CONFLICT DO NOTHING
                    RETURNING message_id
                ),
                upd AS (
                    UPDATE messages m
                       SET state = 'delivering', updated_at = now(), topic = i.topic,
                           source_partition = i.source_partition, source_offset = i.source_offset
                      FROM incoming i
                     WHERE m.message_id = i.message_id AND m.state IN ('queued', 'delivering')
                    RETURNING m.message_id, m.attempts, m.first_attempt_at
                )
                SELECT i.message_id,
                       CASE WHEN ins.message_id IS NOT NULL OR upd.message_id IS NOT NULL
                                THEN 'claimed'
                            WHEN m.message_id IS NOT NULL THEN 'final'
                            ELSE 'conflict' END,
                       coalesce(m.state, 'delivering'),
                       coalesce(upd.attempts, 0),
                       upd.first_attempt_at,
                       (SELECT max(d.revision) FROM messages d
                         WHERE d.identity_hash = i.identity_hash
                           AND d.state IN {ACCEPTED_UPSTREAM!r})
                  FROM incoming i
                  LEFT JOIN ins ON ins.message_id = i.message_id
                  LEFT JOIN upd ON upd.message_id = i.message_id
                  LEFT JOIN messages m ON m.message_id = i.message_id
                """
            ),
            {
                "ids": [m.message_id for m in rows],
                "desks": [m.desk for m in rows],
                "traders": [m.trader for m in rows],
                "batches": [m.batch_id for m in rows],
                "runs": [m.settlement_run_id for m in rows],
                "contracts": [m.contract_id for m in rows],
                "markets": [m.market for m in rows],
                "identities": [m.identity for m in rows],
                "revisions": [m.revision for m in rows],
                "topics": [m.topic for m in rows],
                "positions": [m.position_mwh for m in rows],
                "payloads": [cipher.seal(m.value, m.message_id) for m in rows],
                "kid": cipher.active_kid,
                "traces": [m.trace_id for m in rows],
                "partitions": [m.partition for m in rows],
                "offsets": [m.offset for m in rows],
            },
        )
        claims = {
            mid: Claim(status, state, attempts, first_at, max_rev)
            for mid, status, state, attempts, first_at, max_rev in result
        }
        claimed = [m for m, c in claims.items() if c.status == "claimed"]
        await audit.append(conn, audit.state_events(actor, "delivering", claimed))
        return claims


@dataclass(slots=True)
class Outcome:
    """The result of forwarding one message: a final state, or progress while retrying."""

    message_id: str
    state: str
    attempts: int
    detail: str | None = None
    upstream_transaction_id: str | None = None
    last_error: str | None = None
    reconciled_position_mwh: Decimal | None = None
    first_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    hold: dict[str, Any] | None = None
    dead_letter: dict[str, Any] | None = None
    record_event: bool = True


async def write_outcomes(
    engine: AsyncEngine, pending: Sequence[Outcome], actor: Actor, cipher: PayloadCipher
) -> None:
    # One row per message: an UPDATE ... FROM with two source rows for one target applies an
    # arbitrary one, so a retry's progress note must never compete with the final state.
    outcomes = list({o.message_id: o for o in pending}.values())
    if not outcomes:
        return
    async with engine.begin() as conn:
        updated = await conn.execute(
            text(
                """
                WITH o AS (
                    SELECT * FROM unnest(
                        CAST(:ids AS text[]), CAST(:states AS text[]), CAST(:attempts AS int[]),
                        CAST(:txns AS text[]), CAST(:errors AS text[]),
                        CAST(:reconciled AS numeric[]), CAST(:firsts AS timestamptz[]),
                        CAST(:lasts AS timestamptz[]), CAST(:details AS text[]),
                        CAST(:events AS boolean[]))
                    AS t(message_id, state, attempts, txn, err, reconciled, first_at, last_at,
                         detail, event)
                ),
                upd AS (
                    UPDATE messages m
                       SET state = o.state, attempts = o.attempts,
                           upstream_transaction_id = coalesce(o.txn, m.upstream_transaction_id),
                           last_error = coalesce(o.err, m.last_error),
                           reconciled_position_mwh = coalesce(o.reconciled,
                                                              m.reconciled_position_mwh),
                           first_attempt_at = coalesce(m.first_attempt_at, o.first_at),
                           last_attempt_at = coalesce(o.last_at, m.last_attempt_at),
                           updated_at = now()
                      FROM o
                     WHERE m.message_id = o.message_id
                       AND m.state IN ('queued', 'delivering')
                    RETURNING m.message_id
                )
                SELECT o.message_id FROM o JOIN upd USING (message_id) WHERE o.event
                """
            ),
            {
                "ids": [o.message_id for o in outcomes],
                "states": [o.state for o in outcomes],
                "attempts": [o.attempts for o in outcomes],
                "txns": [o.upstream_transaction_id for o in outcomes],
                "errors": [o.last_error for o in outcomes],
                "reconciled": [o.reconciled_position_mwh for o in outcomes],
                "firsts": [o.first_attempt_at for o in outcomes],
                "lasts": [o.last_attempt_at for o in outcomes],
                "details": [o.detail for o in outcomes],
                "events": [o.record_event for o in outcomes],
            },
        )
        changed = {row.message_id for row in updated}
        await audit.append(
            conn,
            [
                audit.AuditEvent(
                    actor,
                    f"message.{o.state}",
                    state=o.state,
                    message_id=o.message_id,
                    detail=o.detail,
                )
                for o in outcomes
                if o.message_id in changed
            ],
        )
        holds = [o.hold for o in outcomes if o.hold]
        if holds:
            await conn.execute(
                text(
                    """
                    INSERT INTO holds (hold_id, message_id, desk, contract_id,
                        submitted_position_mwh, reconciled_position_mwh, variance)
                    VALUES (:hold_id, :message_id, :desk, :contract_id, :submitted, :reconciled,
                            :variance)
                    ON CONFLICT (message_id) DO NOTHING
                    """
                ),
                holds,
            )
        dead = [o.dead_letter for o in outcomes if o.dead_letter]
        if dead:
            await insert_dead_letters(conn, dead, cipher)


async def insert_dead_letters(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], cipher: PayloadCipher
) -> None:
    await conn.execute(
        text(
            """
            INSERT INTO dead_letters (dead_letter_id, message_id, desk, settlement_run_id,
                contract_id, reason, error_status, attempts, last_error, first_attempt_at,
                last_attempt_at, source_topic, source_partition, source_offset, kafka_key,
                kafka_value, value_kid, kafka_headers)
            VALUES (:dead_letter_id, :message_id, :desk, :settlement_run_id, :contract_id,
                :reason, :error_status, :attempts, :last_error, :first_attempt_at,
                :last_attempt_at, :source_topic, :source_partition, :source_offset, :kafka_key,
                :kafka_value, :value_kid, CAST(:kafka_headers AS jsonb))
            ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING
            """
        ),
        [
            {
                **r,
                "kafka_value": cipher.seal(r["kafka_value"], r["dead_letter_id"]),
                "value_kid": cipher.active_kid,
                "kafka_headers": orjson.dumps(r["kafka_headers"]).decode(),
            }
            for r in rows
        ],
    )


async def record_untrusted_dead_letters(
    engine: AsyncEngine, rows: Sequence[dict[str, Any]], cipher: PayloadCipher
) -> None:
    """Dead letters for messages that never entered the ledger (bad signature, bad shape)."""
    if rows:
        async with engine.begin() as conn:
            await insert_dead_letters(conn, rows, cipher)
