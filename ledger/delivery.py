"""The workers' statements: claims with leases, fenced outcomes, dead letters as data.

Rules kept here (issue #6):
- a worker sends a record only under a lease it claimed: `delivering`, its owner, an expiry and
  an epoch that grows with every claim (a fencing token); a lease is claimed only on the live
  copy of a record (its publication), only while `queued` or once the previous lease expired;
- every write of a worker about a record names the epoch it claimed: a write from a worker
  whose lease was taken over (a stalled process waking up) changes nothing;
- `attempts` counts POSTs that may have been sent: the claim reserves the first of its POSTs
  before it is sent, so a crash can never hide an attempt; attempts and retry time carry over
  from one claim to the next;
- a dead letter is written to the ledger, in the same transaction as its record's state, before
  anything is published (the outbox publishes it): a crash can delay it, never lose it or
  invent one; it is recorded once per cause (`dedupe_key`);
- a late answer that shows a record taken by the upstream closes a dead letter that only
  guessed otherwise (retries exhausted, no token): the ledger follows the upstream;
- claims and outcomes are one statement for a whole group of records, never a round trip each.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import acceptance, audit
from ledger.crypto import PayloadCipher
from ledger.db import fetch_direct, sql
from ledger.rows import (
    Actor,
    AuditEvent,
    ClaimRequest,
    ClaimRow,
    DeadLetterRow,
    DeadLetterToPublish,
    HoldRow,
    LateTaken,
    Outcome,
    Predecessors,
)
from ledger.tables import accepting_batch_sql
from schemas.states import (
    TAKEN_UPSTREAM,
    UNCERTAIN_REASONS,
    MessageState,
    Sequencing,
    sql_values,
)
from schemas.text import cap_text, header_text

T = TypeVar("T")

# -- claims ---------------------------------------------------------------------------------


_TAKEN = sql_values(TAKEN_UPSTREAM)


async def claim(
    engine: AsyncEngine,
    requests: Sequence[ClaimRequest],
    *,
    owner: str,
    lease_s: float,
    actor: Actor,
    sequencing: Sequencing = Sequencing.OFF,
) -> list[ClaimRow]:
    """Take the lease of every requested record that is claimable, and report what the
    ledger says of each (one statement for the group)."""
    if not requests:
        return []
    # One statement, on its own: the lease, what the ledger says of each record, and the
    # audit rows of the leases taken — no BEGIN and COMMIT round trips, and on asyncpg directly.
    audit_sql, audit_params = audit.insert_statement(
        audit.state_events(actor, MessageState.DELIVERING, [r.message_id for r in requests]),
        where="WHERE e.message_id IN (SELECT message_id FROM claimed)",
    )
    result = await fetch_direct(
        engine,
        f"""
        WITH req AS (
            SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:pubs AS text[]),
                                 CAST(:parts AS int[]), CAST(:offs AS bigint[]))
                   WITH ORDINALITY
                   AS r(message_id, publication, source_partition, source_offset, ord)
        ),
        seen AS (
            SELECT r.ord, r.message_id AS requested, r.publication AS requested_pub,
                   r.source_partition, r.source_offset,
                   m.message_id, m.publication, m.attempts, m.budget_used_s,
                   m.lease_until, m.revision, m.first_attempt_at,
                   -- written `queued` under its request, pending until the batch is accepted
                   CASE WHEN ab.batch_id IS NOT NULL THEN 'pending' ELSE m.state END AS state,
                   ab.pending_until,
                   (SELECT max(t.revision) FROM messages t
                     WHERE t.identity_hash = m.identity_hash
                       AND t.state IN {_TAKEN}) AS max_taken_revision,
                   coalesce(p.waiting, 0) AS waiting,
                   coalesce(p.replaying, 0) AS replaying,
                   coalesce(p.parked, 0) AS parked, coalesce(p.dead_open, 0) AS dead_open,
                   p.blocker, p.ahead
              FROM req r
              LEFT JOIN messages m ON m.message_id = r.message_id
              LEFT JOIN batches ab ON {accepting_batch_sql("m", "ab")}
              LEFT JOIN LATERAL (
                  SELECT count(*) FILTER (
                             WHERE q.state IN ('pending', 'queued', 'delivering')
                               AND q.publication_kind <> 'replay') AS waiting,
                         count(*) FILTER (
                             WHERE q.state IN ('queued', 'delivering')
                               AND q.publication_kind = 'replay') AS replaying,
                         count(*) FILTER (WHERE q.state = 'parked') AS parked,
                         count(*) FILTER (WHERE q.state = 'dead_lettered'
                                            AND d.status IN ('open', 'replaying'))
                             AS dead_open,
                         (array_agg(q.message_id ORDER BY q.accept_seq) FILTER (
                             WHERE q.state = 'parked'
                                OR (q.state IN ('queued', 'delivering')
                                    AND q.publication_kind = 'replay')
                                OR (q.state = 'dead_lettered'
                                    AND d.status IN ('open', 'replaying'))))[1]
                             AS blocker,
                         (array_agg(q.message_id ORDER BY q.accept_seq) FILTER (
                             WHERE q.state IN ('pending', 'queued', 'delivering')))[1]
                             AS ahead
                    FROM messages q
                    LEFT JOIN dead_letters d ON d.dead_letter_id = q.dead_letter_id
                   WHERE q.desk = m.desk AND q.contract_id = m.contract_id
                     AND q.accept_seq < m.accept_seq
                     AND q.state IN ('pending', 'queued', 'delivering', 'parked',
                                     'dead_lettered')
              ) p ON true
        ),
        claimed AS (
            -- A record that would only wait for an earlier one (Predecessors.hold_back)
            -- is not leased: its claim is a read, and nothing is written or released.
            UPDATE messages m
               SET state = 'delivering', lease_owner = :owner,
                   lease_epoch = m.lease_epoch + 1,
                   lease_until = now() + make_interval(secs => :lease),
                   attempts = m.attempts + 1,
                   first_attempt_at = coalesce(m.first_attempt_at, now()),
                   source_partition = s.source_partition,
                   source_offset = s.source_offset, updated_at = now()
              FROM seen s
             WHERE m.message_id = s.requested AND m.publication = s.requested_pub
               -- queued, and its request seen accepted (which it stays) by this statement
               AND ((m.state = 'queued' AND s.state = 'queued')
                    OR (m.state = 'delivering' AND m.lease_until < now()))
               AND NOT (
                   (s.max_taken_revision IS NULL OR s.revision >= s.max_taken_revision)
                   AND CASE WHEN :contract_sequencing
                            THEN s.dead_open = 0 AND s.parked = 0
                                 AND (s.waiting > 0 OR s.replaying > 0)
                            ELSE s.waiting > 0 END)
            RETURNING m.message_id, m.lease_epoch
        ),
        audited AS ({audit_sql})
        SELECT s.requested AS message_id, s.message_id IS NOT NULL AS exists, s.state,
               coalesce(s.publication = s.requested_pub, false) AS live_copy,
               c.lease_epoch AS claimed_epoch,
               coalesce(s.attempts, 0) AS attempts,
               coalesce(s.budget_used_s, 0) AS budget_used_s,
               coalesce(s.lease_until > now(), false) AS lease_live,
               coalesce(s.pending_until < now(), false) AS pending_expired,
               coalesce(s.revision, 0) AS revision,
               coalesce(s.first_attempt_at, now()) AS first_attempt_at,
               s.max_taken_revision, s.waiting, s.replaying, s.parked, s.dead_open,
               s.blocker, s.ahead
          FROM seen s
          LEFT JOIN claimed c ON c.message_id = s.requested
         ORDER BY s.ord
        """,
        {
            "ids": [r.message_id for r in requests],
            "pubs": [r.publication for r in requests],
            "parts": [r.partition for r in requests],
            "offs": [r.offset for r in requests],
            "owner": owner,
            "lease": lease_s,
            "contract_sequencing": sequencing is Sequencing.CONTRACT,
            **audit_params,
        },
    )
    return [
        ClaimRow(
            message_id=r["message_id"],
            exists=r["exists"],
            state=MessageState(r["state"]) if r["state"] else None,
            live_copy=r["live_copy"],
            epoch=r["claimed_epoch"],
            attempts=int(r["attempts"]),
            budget_used_s=float(r["budget_used_s"]),
            lease_live=r["lease_live"],
            pending_expired=r["pending_expired"],
            revision=int(r["revision"]),
            max_taken_revision=r["max_taken_revision"],
            predecessors=Predecessors(
                int(r["waiting"]),
                int(r["replaying"]),
                int(r["parked"]),
                int(r["dead_open"]),
                r["blocker"],
                r["ahead"],
            ),
            first_attempt_at=r["first_attempt_at"],
        )
        for r in result
    ]


# -- outcomes -------------------------------------------------------------------------------


_FINAL_FOR_RECORD = sql_values(
    frozenset(
        {
            MessageState.DELIVERED,
            MessageState.HELD,
            MessageState.DEAD_LETTERED,
            MessageState.SUPERSEDED,
        }
    )
)


_APPLY = f"""
    WITH o AS (
        SELECT * FROM unnest(
            CAST(:ids AS text[]), CAST(:epochs AS int[]), CAST(:states AS text[]),
            CAST(:attempts AS int[]), CAST(:budgets AS float8[]),
            CAST(:txns AS text[]), CAST(:errors AS text[]),
            CAST(:reconciled AS numeric[]), CAST(:lasts AS timestamptz[]),
            CAST(:leases AS float8[]), CAST(:dls AS text[]),
            CAST(:behind AS text[]))
        AS t(message_id, epoch, state, attempts, budget, txn, err, reconciled,
             last_at, lease_s, dead_letter_id, parked_behind)
    )
    UPDATE messages m
       SET state = o.state, attempts = o.attempts, budget_used_s = o.budget,
           upstream_transaction_id = coalesce(o.txn, m.upstream_transaction_id),
           last_error = coalesce(o.err, m.last_error),
           reconciled_position_mwh = coalesce(o.reconciled, m.reconciled_position_mwh),
           last_attempt_at = coalesce(o.last_at, m.last_attempt_at),
           lease_until = CASE WHEN o.lease_s IS NULL THEN NULL
                              ELSE now() + make_interval(secs => o.lease_s) END,
           dead_letter_id = coalesce(o.dead_letter_id, m.dead_letter_id),
           parked_behind = o.parked_behind,
           final_at = CASE WHEN o.state IN {_FINAL_FOR_RECORD} THEN now()
                           ELSE m.final_at END,
           updated_at = now()
      FROM o
     WHERE m.message_id = o.message_id AND m.lease_epoch = o.epoch
       AND m.state = 'delivering'
    RETURNING m.message_id
"""


def _apply_params(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "ids": [o.message_id for o in outcomes],
        "epochs": [o.epoch for o in outcomes],
        "states": [str(o.state) for o in outcomes],
        "attempts": [o.attempts for o in outcomes],
        "budgets": [o.budget_used_s for o in outcomes],
        "txns": [o.upstream_transaction_id for o in outcomes],
        "errors": [o.last_error for o in outcomes],
        "reconciled": [o.reconciled_position_mwh for o in outcomes],
        "lasts": [o.last_attempt_at for o in outcomes],
        "leases": [o.renew_lease_s for o in outcomes],
        "dls": [o.dead_letter_id for o in outcomes],
        "behind": [o.parked_behind for o in outcomes],
    }


async def write_outcomes(
    engine: AsyncEngine, outcomes: Sequence[Outcome], cipher: PayloadCipher
) -> set[str]:
    """Apply outcomes whose lease is still current; return the ids applied. Holds, dead letters
    and audit rows of applied outcomes go in the same transaction."""
    if not outcomes:
        return set()
    if not any(o.hold or o.dead_letter for o in outcomes) and all(
        e.message_id == o.message_id for o in outcomes for e in o.events
    ):
        # The common group (delivered, released, progress): the update and the audit rows of
        # the outcomes it applied in one statement, on asyncpg directly, no BEGIN or COMMIT.
        audit_sql, audit_params = audit.insert_statement(
            [e for o in outcomes for e in o.events],
            where="WHERE e.message_id IN (SELECT message_id FROM applied)",
        )
        rows = await fetch_direct(
            engine,
            f"WITH applied AS ({_APPLY}), audited AS ({audit_sql}) SELECT * FROM applied",
            {**_apply_params(outcomes), **audit_params},
        )
        return {r["message_id"] for r in rows}
    async with engine.begin() as conn:
        result = await conn.execute(sql(_APPLY), _apply_params(outcomes))
        applied = {r.message_id for r in result}
        done = [o for o in outcomes if o.message_id in applied]
        await insert_holds(conn, [o.hold for o in done if o.hold])
        await insert_dead_letters(conn, [o.dead_letter for o in done if o.dead_letter], cipher)
        await audit.append(conn, [e for o in done for e in o.events])
    return applied


async def insert_holds(conn: AsyncConnection, holds: Sequence[HoldRow]) -> None:
    if not holds:
        return
    await conn.execute(
        sql(
            """
            INSERT INTO holds (hold_id, message_id, desk, contract_id, submitted_position_mwh,
                               reconciled_position_mwh, variance, reason)
            VALUES (:hold_id, :message_id, :desk, :contract_id, :submitted, :reconciled,
                    :variance, :reason)
            ON CONFLICT (message_id) DO NOTHING
            """
        ),
        [
            {
                "hold_id": h.hold_id,
                "message_id": h.message_id,
                "desk": h.desk,
                "contract_id": h.contract_id,
                "submitted": h.submitted,
                "reconciled": h.reconciled,
                "variance": h.variance,
                "reason": h.reason,
            }
            for h in holds
        ],
    )


def _display_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    shown: dict[str, str] = {}
    for name, value in headers:
        shown.setdefault(header_text(name.encode()), header_text(value))
    return shown


def raw_headers(headers: Sequence[tuple[str, bytes | None]]) -> list[list[str | None]]:
    return [
        [name, base64.b64encode(value).decode() if value is not None else None]
        for name, value in headers
    ]


def unpack_headers(raw: Sequence[Sequence[str | None]]) -> list[tuple[str, bytes | None]]:
    return [(str(n), base64.b64decode(v) if v is not None else None) for n, v in raw]


async def insert_dead_letters(
    conn: AsyncConnection, rows: Sequence[DeadLetterRow], cipher: PayloadCipher
) -> list[str]:
    """Insert dead letters not recorded yet; returns the ids inserted."""
    if not rows:
        return []
    inserted = await conn.execute(
        sql(
            """
            INSERT INTO dead_letters (dead_letter_id, dedupe_key, message_id, desk,
                settlement_run_id, contract_id, reason, error_status, attempts, last_error,
                first_attempt_at, last_attempt_at, source_topic, source_partition,
                source_offset, kafka_key, kafka_value, value_kid, kafka_headers, raw_headers)
            SELECT * FROM unnest(
                CAST(:ids AS text[]), CAST(:keys AS text[]), CAST(:mids AS text[]),
                CAST(:desks AS text[]), CAST(:runs AS text[]), CAST(:contracts AS text[]),
                CAST(:reasons AS text[]), CAST(:statuses AS int[]), CAST(:attempts AS int[]),
                CAST(:errors AS text[]), CAST(:firsts AS timestamptz[]),
                CAST(:lasts AS timestamptz[]), CAST(:topics AS text[]),
                CAST(:partitions AS int[]), CAST(:offsets AS bigint[]),
                CAST(:kkeys AS bytea[]), CAST(:values AS bytea[]), CAST(:kids AS text[]),
                CAST(:shown AS jsonb[]), CAST(:raw AS jsonb[]))
            ON CONFLICT (dedupe_key) DO NOTHING
            RETURNING dead_letter_id
            """
        ),
        {
            "ids": [r.dead_letter_id for r in rows],
            "keys": [r.dedupe_key for r in rows],
            "mids": [r.message_id for r in rows],
            "desks": [r.desk for r in rows],
            "runs": [r.settlement_run_id for r in rows],
            "contracts": [r.contract_id for r in rows],
            "reasons": [r.reason for r in rows],
            "statuses": [r.error_status for r in rows],
            "attempts": [r.attempts for r in rows],
            "errors": [cap_text(r.last_error) for r in rows],
            "firsts": [r.first_attempt_at for r in rows],
            "lasts": [r.last_attempt_at for r in rows],
            "topics": [r.source_topic for r in rows],
            "partitions": [r.source_partition for r in rows],
            "offsets": [r.source_offset for r in rows],
            "kkeys": [r.kafka_key for r in rows],
            "values": [cipher.seal(r.kafka_value, r.dead_letter_id) for r in rows],
            "kids": [cipher.active_kid for _ in rows],
            "shown": [orjson.dumps(_display_headers(r.headers)).decode() for r in rows],
            "raw": [orjson.dumps(raw_headers(r.headers)).decode() for r in rows],
        },
    )
    return [r.dead_letter_id for r in inserted]


async def record_untrusted(
    engine: AsyncEngine, rows: Sequence[DeadLetterRow], actor: Actor, cipher: PayloadCipher
) -> None:
    """Dead letters for consumed records no accepted record stands behind (bad signature, bad
    shape, never accepted): recorded once, whatever bytes they carry."""
    if not rows:
        return
    async with engine.begin() as conn:
        inserted = set(await insert_dead_letters(conn, rows, cipher))
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor, "dead_letter.recorded", subject_id=r.dead_letter_id, detail=r.reason
                )
                for r in rows
                if r.dead_letter_id in inserted
            ],
        )


# -- late answers ---------------------------------------------------------------------------


async def record_late_taken(engine: AsyncEngine, late: LateTaken, actor: Actor) -> bool:
    """Close a dead letter that guessed wrong: the record was taken after all."""
    async with engine.begin() as conn:
        closed = (
            await conn.execute(
                sql(
                    f"""
                    UPDATE dead_letters d
                       SET status = 'resolved', closed_at = now(), closed_by = :actor,
                           close_reason = :detail
                      FROM messages m
                     WHERE m.message_id = :mid AND m.state = 'dead_lettered'
                       AND d.dead_letter_id = m.dead_letter_id
                       AND d.reason IN {sql_values(UNCERTAIN_REASONS)}
                       AND d.status = 'open'
                    RETURNING d.dead_letter_id
                    """
                ),
                {"mid": late.message_id, "actor": actor.name, "detail": late.detail},
            )
        ).first()
        if closed is None:
            return False
        await conn.execute(
            sql(
                """
                UPDATE messages
                   SET state = :state, final_at = now(), updated_at = now(),
                       upstream_transaction_id = coalesce(:txn, upstream_transaction_id),
                       reconciled_position_mwh = coalesce(:reconciled, reconciled_position_mwh)
                 WHERE message_id = :mid AND state = 'dead_lettered'
                """
            ),
            {
                "state": str(late.state),
                "txn": late.upstream_transaction_id,
                "reconciled": late.reconciled_position_mwh,
                "mid": late.message_id,
            },
        )
        if late.hold is not None:
            await insert_holds(conn, [late.hold])
        await audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    "dead_letter.resolved",
                    subject_id=closed.dead_letter_id,
                    message_id=late.message_id,
                    detail=late.detail,
                ),
                AuditEvent(
                    actor,
                    f"message.{late.state}",
                    state=late.state,
                    message_id=late.message_id,
                    detail=late.detail,
                ),
            ],
        )
        return True


# -- the dead-letter outbox -----------------------------------------------------------------


async def unpublished(
    conn: AsyncConnection, limit: int, cipher: PayloadCipher
) -> list[DeadLetterToPublish]:
    """Dead letters not on the reconciliation topic yet, oldest first, locked for this
    publisher (others skip them) until its transaction ends."""
    rows = await conn.execute(
        sql(
            """
            SELECT dead_letter_id, kafka_key, kafka_value, value_kid, raw_headers, reason,
                   error_status, last_error, attempts, first_attempt_at, last_attempt_at,
                   source_topic, source_partition, source_offset
              FROM dead_letters
             WHERE published_at IS NULL
             ORDER BY created_at, dead_letter_id
             LIMIT :limit
             FOR UPDATE SKIP LOCKED
            """
        ),
        {"limit": limit},
    )
    found: list[DeadLetterToPublish] = []
    for r in rows:
        found.append(
            DeadLetterToPublish(
                r.dead_letter_id,
                r.kafka_key,
                cipher.open(r.value_kid, r.kafka_value, r.dead_letter_id),
                unpack_headers(r.raw_headers),
                {
                    "reason": r.reason,
                    "status": r.error_status,
                    "message": r.last_error or "",
                    "attempts": r.attempts,
                    "first_attempt_at": r.first_attempt_at,
                    "last_attempt_at": r.last_attempt_at,
                    "topic": r.source_topic,
                    "partition": r.source_partition,
                    "offset": r.source_offset,
                },
            )
        )
    return found


async def mark_published(conn: AsyncConnection, dead_letter_ids: Sequence[str]) -> None:
    await conn.execute(
        sql(
            "UPDATE dead_letters SET published_at = now() "
            "WHERE dead_letter_id = ANY(CAST(:ids AS text[])) AND published_at IS NULL"
        ),
        {"ids": list(dead_letter_ids)},
    )


async def unpublished_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(
            sql("SELECT count(*) FROM dead_letters WHERE published_at IS NULL")
        )
    return int(count or 0)


def unique_runs(items: Sequence[T], key: Callable[[T], str]) -> list[list[T]]:
    """Split a group so no statement carries one record twice (an UPDATE ... FROM with two
    source rows for one target applies an arbitrary one): first occurrences, then the rest."""
    runs: list[list[T]] = []
    for item in items:
        for run in runs:
            if all(key(other) != key(item) for other in run):
                run.append(item)
                break
        else:
            runs.append([item])
    return runs


class DeliveryStore:
    """The ledger as a worker's pipeline uses it (workers.pipeline.DeliveryLedger)."""

    def __init__(
        self,
        engine: AsyncEngine,
        cipher: PayloadCipher,
        *,
        owner: str,
        lease_s: float,
        actor: Actor,
        sequencing: Sequencing = Sequencing.OFF,
    ) -> None:
        self.engine = engine
        self.sequencing = sequencing
        self.cipher = cipher
        self.owner = owner
        self.lease_s = lease_s
        self.actor = actor

    async def claim(self, requests: Sequence[ClaimRequest]) -> list[ClaimRow]:
        found: dict[int, ClaimRow] = {}
        indexed = list(enumerate(requests))
        for run in unique_runs(indexed, lambda pair: pair[1].message_id):
            rows = await claim(
                self.engine,
                [r for _, r in run],
                owner=self.owner,
                lease_s=self.lease_s,
                actor=self.actor,
                sequencing=self.sequencing,
            )
            found.update({i: row for (i, _), row in zip(run, rows, strict=True)})
        return [found[i] for i in range(len(requests))]

    async def write(self, outcomes: Sequence[Outcome]) -> list[bool]:
        applied: dict[int, bool] = {}
        indexed = list(enumerate(outcomes))
        for run in unique_runs(indexed, lambda pair: pair[1].message_id):
            done = await write_outcomes(self.engine, [o for _, o in run], self.cipher)
            applied.update({i: o.message_id in done for i, o in run})
        return [applied[i] for i in range(len(outcomes))]

    async def record_untrusted(self, rows: Sequence[DeadLetterRow]) -> list[None]:
        await record_untrusted(self.engine, rows, self.actor, self.cipher)
        return [None] * len(rows)

    async def record_late_taken(self, late: LateTaken) -> bool:
        return await record_late_taken(self.engine, late, self.actor)

    async def sweep_expired(self) -> int:
        return await acceptance.sweep_expired(self.engine)
