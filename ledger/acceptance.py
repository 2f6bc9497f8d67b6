"""Accepting a desk's request: one transaction before the publish, one after it.

Rules kept here (CONTRACT §3, issue #6 I2):
- before anything reaches Kafka, the ledger holds the request as `pending`: its batch, its
  records (one accepted record per settlement identity and revision: a conflicting one is
  refused by the database, also between two requests racing each other) and its
  Idempotency-Key; so a worker that reads a copy always finds its record, and waits while it
  is pending;
- after the broker acknowledged every record, `complete` turns the request `accepted`, which
  makes its records `queued` (they were written so, under the pending batch: one row's write
  completes a request of any size, tables.accepting_sql) — only then is 202 answered; a
  request whose publish failed is `aborted` (503): its records are never delivered, whatever
  copies reached the broker, until a retry accepts them again;
- a pending request is aborted by whoever finds it past its lease (the intake that died, or the
  broker that stalled, never answered 202 for it); `complete` and `abort` meet on the batch
  row, so exactly one of them wins;
- a record already accepted by an earlier request is not published again: the new request
  names it and is answered at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger import audit, reads, upstream
from ledger.crypto import PayloadCipher
from ledger.db import array_literal, deadlocked, fetch_direct, join_array_literals, sql
from ledger.rows import Actor, AuditEvent, UpstreamView
from ledger.tables import accepting_batch_sql
from schemas.states import BatchState, MessageState


@dataclass(frozen=True, slots=True)
class RecordToAccept:
    index: int
    message_id: str
    identity: str
    contract_id: str
    market: str
    revision: int
    topic: str
    position_mwh: str
    value: bytes

    def __reduce__(self) -> tuple[type[RecordToAccept], tuple[Any, ...]]:
        # as schemas.envelope.Envelope's: one call per record when unpickled
        return (
            RecordToAccept,
            (
                self.index,
                self.message_id,
                self.identity,
                self.contract_id,
                self.market,
                self.revision,
                self.topic,
                self.position_mwh,
                self.value,
            ),
        )


@dataclass(frozen=True, slots=True)
class Request:
    """One desk request as the ledger records it."""

    batch_id: str
    desk: str
    trader: str
    settlement_run_id: str
    idempotency_key: str
    request_hash: str
    trace_id: str
    resource_kind: str  # 'batch' | 'message'
    resource_id: str
    status_url: str
    records: Sequence[RecordToAccept]
    pending_lease_s: float
    key_lease_s: float
    # the records as the statements take them, when laid out already (`columns_for`, in the
    # intake's worker process for a big batch); else built by `begin`
    columns: Columns | None = None

    @property
    def unique(self) -> list[RecordToAccept]:
        """Each message once (the same record twice in one request is one message)."""
        return unique_records(self.records)


def unique_records(records: Sequence[RecordToAccept]) -> list[RecordToAccept]:
    return list({r.message_id: r for r in records}.values())


@dataclass(frozen=True, slots=True)
class KeyHeld:
    """The Idempotency-Key is held by another request, finished or still in flight."""

    state: str
    request_hash: str
    resource_kind: str | None
    resource_id: str | None
    status_url: str | None


@dataclass(frozen=True, slots=True)
class RevisionConflict:
    index: int
    conflicting_message_id: str | None


@dataclass(frozen=True, slots=True)
class Busy:
    """A record of this request is being accepted by another request right now."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Pending:
    """The request is recorded as pending; publish `to_publish`, then `complete`."""

    to_publish: Sequence[RecordToAccept]


Begun = Pending | KeyHeld | RevisionConflict | Busy


# Above this many records, a request's payloads are encrypted in a thread before its
# transaction opens (the event loop keeps serving other requests meanwhile).
SEAL_IN_THREAD = 64


@dataclass(frozen=True, slots=True)
class Columns:
    """A request's records as the statements' array parameters, each message once, payloads
    sealed: built before the transaction — in the intake's worker process for a big batch, or
    in a thread (sealing and 5,000-long lists are CPU the event loop would otherwise spend
    while other desks wait; in a thread it still held the intake's GIL ~35 ms a batch)."""

    unique: Sequence[RecordToAccept]
    params: dict[str, Any]


def columns_for(records: Sequence[RecordToAccept], cipher: PayloadCipher) -> Columns:
    unique = unique_records(records)
    sealed = [cipher.seal(r.value, r.message_id) for r in unique]
    return Columns(
        unique,
        {  # each column as one array text (ledger.db.array_literal), the payloads excepted
            "idx": array_literal(r.index for r in records),
            "all_ids": array_literal(r.message_id for r in records),
            "ids": array_literal(r.message_id for r in unique),
            "contracts": array_literal(r.contract_id for r in unique),
            "markets": array_literal(r.market for r in unique),
            "identities": array_literal(r.identity for r in unique),
            "revisions": array_literal(r.revision for r in unique),
            "topics": array_literal(r.topic for r in unique),
            "positions": array_literal(r.position_mwh for r in unique),  # decimal text
            # The sealed payloads one after the other, as one bytea parameter (sent as is), and
            # their lengths. As a bytea[] array text each byte went twice over the wire, in hex
            # (encoded by the preparing process, decoded by Postgres): recording 1,000 records
            # took 19.8 ms that way against 18.0 ms this way (60 each, alternating).
            "payloads": b"".join(sealed),
            "payload_lengths": array_literal(len(p) for p in sealed),
            "kid": cipher.active_kid,
        },
    )


def join_columns(parts: Sequence[Columns], unique: Sequence[RecordToAccept]) -> Columns:
    """The columns of consecutive parts of one request whose parts share no message: each
    array the parts' arrays one after the other, as `columns_for` builds it whole; `unique`
    is their records one after the other (the caller's sequence: it may leave them unread)."""
    kids = {part.params["kid"] for part in parts}
    if len(kids) != 1:
        raise ValueError("parts sealed under different keys")
    params: dict[str, Any] = {
        name: join_array_literals([part.params[name] for part in parts])
        for name in parts[0].params
        if name not in ("kid", "payloads")
    }
    params["payloads"] = b"".join(part.params["payloads"] for part in parts)
    params["kid"] = kids.pop()
    return Columns(unique, params)


async def begin(engine: AsyncEngine, req: Request, cipher: PayloadCipher) -> Begun:
    if req.columns is not None:
        columns = req.columns
    elif len(req.records) > SEAL_IN_THREAD:
        columns = await asyncio.to_thread(columns_for, req.records, cipher)
    else:
        columns = columns_for(req.records, cipher)
    try:
        fresh = await _begin_fresh(engine, req, columns)
        if fresh is not None:
            return fresh
        async with engine.begin() as conn:
            held = await _take_key(conn, req)
            if held is not None:
                return held
            pending = await _insert_pending(conn, req, columns)
            unique = columns.unique
            others = [r.message_id for r in unique if r.message_id not in pending]
            if others:
                await _refuse_if_pending_elsewhere(conn, others)
            return Pending([r for r in unique if r.message_id in pending])
    except _PendingElsewhere as busy:
        if busy.expired:
            async with engine.begin() as conn:
                await _abort_batches(conn, busy.expired, expired_only=True)
        return Busy(busy.wait_s)
    except IntegrityError as exc:
        if "messages_identity_revision" not in str(exc.orig):
            raise
    except Exception as exc:
        if not deadlocked(exc):
            raise
        # Two requests inserting the same new records in other orders, each waiting on one the
        # other inserted first: Postgres rolled this one back (after its deadlock_timeout).
        # Like any request whose records another is accepting, it is Busy and tries again.
        return Busy(0.01)
    return await _conflict(engine, req)


async def _begin_fresh(engine: AsyncEngine, req: Request, columns: Columns) -> Begun | None:
    """The common case — a new Idempotency-Key and records the ledger has never seen — in one
    autocommit statement (one round trip instead of BEGIN, key, records, COMMIT). The records
    go in with a plain INSERT, neither looked up first nor inserted speculatively (ON
    CONFLICT): a record the ledger already holds (accepted, aborted, or being accepted by
    another request right now) fails the whole statement on the primary key, nothing of it is
    kept, and the caller takes the general path (records to re-take, name or wait for) — as it
    does when the key exists, which the statement then leaves alone, inserting nothing."""
    try:
        [row] = await fetch_direct(
            engine,
            _FRESH_SQL,
            {
                **_pending_params(req),
                **columns.params,
                "hash": req.request_hash,
                "key_lease": req.key_lease_s,
            },
        )
    except Exception as exc:  # asyncpg's UniqueViolationError, straight from the driver
        constraint = getattr(exc, "constraint_name", None)
        if constraint == "messages_pkey":
            return None
        if constraint != "messages_identity_revision":
            raise
        return await _conflict(engine, req)
    return Pending(columns.unique) if row["fresh"] else None


async def _take_key(conn: AsyncConnection, req: Request) -> KeyHeld | None:
    taken = (
        await conn.execute(
            sql(
                """
                WITH previous AS (
                    SELECT batch_id FROM idempotency_keys
                     WHERE desk = :desk AND key = :key FOR UPDATE
                )
                INSERT INTO idempotency_keys (desk, key, request_hash, state, lease_until,
                                              batch_id)
                VALUES (:desk, :key, :hash, 'in_flight',
                        now() + make_interval(secs => :lease), :batch)
                ON CONFLICT (desk, key) DO UPDATE
                   SET request_hash = EXCLUDED.request_hash,
                       lease_until = EXCLUDED.lease_until,
                       batch_id = EXCLUDED.batch_id,
                       created_at = now()
                 WHERE idempotency_keys.state = 'in_flight'
                   AND idempotency_keys.lease_until < now()
                RETURNING (SELECT batch_id FROM previous) AS previous_batch
                """
            ),
            {
                "desk": req.desk,
                "key": req.idempotency_key,
                "hash": req.request_hash,
                "lease": req.key_lease_s,
                "batch": req.batch_id,
            },
        )
    ).first()
    if taken is not None:
        if taken.previous_batch:
            # The key's earlier holder died mid-request: its acceptance can never complete.
            await _abort_batches(conn, [taken.previous_batch], expired_only=False)
        return None
    row = (
        await conn.execute(
            sql(
                "SELECT state, request_hash, resource_kind, resource_id, status_url "
                "FROM idempotency_keys WHERE desk = :desk AND key = :key"
            ),
            {"desk": req.desk, "key": req.idempotency_key},
        )
    ).one()
    return KeyHeld(*row)


def _pending_ctes(when: str, *, retake: bool = True) -> str:
    """The request's batch row, its message ids and its records (new ones, and with `retake`
    those of an aborted acceptance, are taken by this request; without it, any record already
    there fails the statement), each insert only `when`. The records go in `queued` under the
    batch, which is `pending`: until it is accepted, so are they (tables.accepting_sql)."""
    return f"""
        batch AS (
            INSERT INTO batches (batch_id, desk, trader, settlement_run_id,
                idempotency_key, record_count, trace_id, state, pending_until)
            SELECT :batch, :desk, :trader, :run, :key, :count, :trace, 'pending',
                   now() + make_interval(secs => :lease)
             WHERE {when}
        ), listed AS (
            INSERT INTO batch_messages (batch_id, idx, message_id)
            SELECT :batch, idx, message_id
              FROM unnest(CAST(CAST(:idx AS text) AS int[]),
                          CAST(CAST(:all_ids AS text) AS text[])) AS t(idx, message_id)
             WHERE {when}
        ), taken AS (
            INSERT INTO messages (message_id, desk, trader, batch_id, settlement_run_id,
                contract_id, market, identity_hash, revision, topic, state, publication,
                publication_kind, accept_seq, queued_at, submitted_position_mwh,
                payload, payload_kid, trace_id)
            SELECT t.message_id, :desk, :trader, :batch, :run, t.contract_id, t.market,
                   t.identity_hash, t.revision, t.topic, 'queued', :batch, 'intake',
                   nextval('message_accept_seq'), now(), t.position,
                   substring(CAST(:payloads AS bytea) FROM t.payload_start
                             FOR t.payload_length), :kid,
                   :trace
              FROM (SELECT *,  -- where each record's payload starts in :payloads
                           CAST(sum(payload_length) OVER (ORDER BY ord) - payload_length + 1
                                AS int) AS payload_start
                      FROM unnest(
                        CAST(CAST(:ids AS text) AS text[]),
                        CAST(CAST(:contracts AS text) AS text[]),
                        CAST(CAST(:markets AS text) AS text[]),
                        CAST(CAST(:identities AS text) AS text[]),
                        CAST(CAST(:revisions AS text) AS int[]),
                        CAST(CAST(:topics AS text) AS text[]),
                        CAST(CAST(:positions AS text) AS numeric[]),
                        CAST(CAST(:payload_lengths AS text) AS int[]))
                        WITH ORDINALITY
                        AS u(message_id, contract_id, market, identity_hash, revision,
                             topic, position, payload_length, ord)
                     ORDER BY ord) t
             WHERE {when}
            {_RETAKE if retake else ""}
            RETURNING message_id)
    """


_RETAKE = """
            ON CONFLICT (message_id) DO UPDATE
               SET state = 'queued', publication = EXCLUDED.publication,
                   publication_kind = 'intake', accept_seq = EXCLUDED.accept_seq,
                   queued_at = EXCLUDED.queued_at, pending_until = NULL,
                   batch_id = EXCLUDED.batch_id,
                   trader = EXCLUDED.trader, trace_id = EXCLUDED.trace_id,
                   topic = EXCLUDED.topic, payload = EXCLUDED.payload,
                   payload_kid = EXCLUDED.payload_kid, updated_at = now()
             WHERE messages.state = 'aborted'
"""


# -- one array, not a row per record (5,000 rows to decode on the event loop)
_TAKEN = "coalesce((SELECT array_agg(message_id) FROM taken), '{}')"

_PENDING_SQL = f"WITH {_pending_ctes('TRUE')} SELECT {_TAKEN}"

# Everything is inserted only when the key went in (it did not exist).
_FRESH_SQL = f"""
    WITH keyed AS (
        INSERT INTO idempotency_keys (desk, key, request_hash, state, lease_until, batch_id)
        VALUES (:desk, :key, :hash, 'in_flight', now() + make_interval(secs => :key_lease),
                :batch)
        ON CONFLICT (desk, key) DO NOTHING
        RETURNING 1
    ), {_pending_ctes("EXISTS (SELECT 1 FROM keyed)", retake=False)}
    SELECT EXISTS (SELECT 1 FROM keyed) AS fresh
"""


def _pending_params(req: Request) -> dict[str, Any]:
    return {
        "desk": req.desk,
        "trader": req.trader,
        "batch": req.batch_id,
        "run": req.settlement_run_id,
        "trace": req.trace_id,
        "lease": req.pending_lease_s,
        "key": req.idempotency_key,
        "count": len(req.records),
    }


async def _insert_pending(conn: AsyncConnection, req: Request, columns: Columns) -> set[str]:
    """The request's rows as pending, in the caller's transaction (one statement); returns the
    ids of the records taken. Records already accepted (or pending elsewhere) are left alone."""
    taken = await conn.execute(sql(_PENDING_SQL), {**_pending_params(req), **columns.params})
    return set(taken.scalar_one())


class _PendingElsewhere(Exception):
    """Rolls back this attempt: another request is accepting some of the same records."""

    def __init__(self, expired: list[str], wait_s: float) -> None:
        super().__init__("records pending under another request")
        self.expired, self.wait_s = expired, wait_s


async def _refuse_if_pending_elsewhere(conn: AsyncConnection, message_ids: list[str]) -> None:
    """Records another request is accepting right now: wait for it (it will not take long),
    unless it overstayed its lease, in which case it is aborted and this request retries."""
    rows = (
        await conn.execute(
            sql(
                f"""
                SELECT b.batch_id AS publication,
                       extract(epoch FROM b.pending_until - now()) AS left_s
                  FROM messages m JOIN batches b ON {accepting_batch_sql("m", "b")}
                 WHERE m.message_id = ANY(CAST(CAST(:ids AS text) AS text[]))
                """
            ),
            {"ids": array_literal(message_ids)},
        )
    ).all()
    if rows:
        expired = sorted({r.publication for r in rows if r.left_s <= 0})
        wait = 0.0 if expired else min(0.05, float(min(r.left_s for r in rows)))
        raise _PendingElsewhere(expired, wait)


async def _conflict(engine: AsyncEngine, req: Request) -> RevisionConflict | Busy:
    """Which record of the request collides with another record's identity and revision."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sql(
                    """
                    SELECT i.ord, m.message_id
                      FROM unnest(CAST(:identities AS text[]), CAST(:revisions AS int[]),
                                  CAST(:ids AS text[])) WITH ORDINALITY
                           AS i(identity_hash, revision, message_id, ord)
                      JOIN messages m ON m.identity_hash = i.identity_hash
                                     AND m.revision = i.revision
                                     AND m.message_id <> i.message_id
                                     AND m.state <> 'aborted'
                     ORDER BY i.ord LIMIT 1
                    """
                ),
                {
                    "identities": [r.identity for r in req.records],
                    "revisions": [r.revision for r in req.records],
                    "ids": [r.message_id for r in req.records],
                },
            )
        ).first()
    if rows is None:
        # No other record holds the identity and revision: the collision was with a request
        # inserting these very records at the same instant (Postgres checks the identity index
        # besides ON CONFLICT's message-id arbiter), or one that aborted since. Nothing of this
        # attempt was recorded; like any record being accepted elsewhere, it is Busy (retried).
        return Busy(0.01)
    return RevisionConflict(req.records[rows.ord - 1].index, rows.message_id)


async def complete(engine: AsyncEngine, req: Request, actor: Actor, new: int) -> bool:
    """The broker acknowledged every record: accepted. False when the request was aborted
    meanwhile (it overstayed its lease), in which case it must be answered 503."""
    # One statement, one round trip: the batch is won (still pending, not aborted by a
    # sweeper meanwhile) and only then is its key completed and the acceptance audited — all
    # in one snapshot. Its records are not written: they went in `queued` under the batch, and
    # the batch's state alone made them pending until now (tables.accepting_sql).
    audit_sql, audit_params = audit.insert_statement(
        [
            AuditEvent(
                actor,
                "batch.accepted",
                state=MessageState.QUEUED,
                batch_id=req.batch_id,
                detail=f"{len(req.records)} record(s) accepted, {new} new",
            )
        ],
        where="WHERE EXISTS (SELECT 1 FROM won)",
    )
    # A single statement is atomic by itself: no BEGIN and COMMIT round trips.
    [row] = await fetch_direct(
        engine,
        f"""
        WITH won AS (
            UPDATE batches SET state = 'accepted', accepted_at = now(), pending_until = NULL
             WHERE batch_id = :batch AND state = 'pending'
            RETURNING 1
        ), keyed AS (
            UPDATE idempotency_keys
               SET state = 'completed', resource_kind = :kind, resource_id = :rid,
                   status_url = :url, completed_at = now()
             WHERE desk = :desk AND key = :key AND batch_id = :batch
               AND EXISTS (SELECT 1 FROM won)
        ), audited AS ({audit_sql})
        SELECT count(*) FROM won
        """,
        {
            "batch": req.batch_id,
            "kind": req.resource_kind,
            "rid": req.resource_id,
            "url": req.status_url,
            "desk": req.desk,
            "key": req.idempotency_key,
            **audit_params,
        },
    )
    won = row[0]
    return bool(won)


async def abort(engine: AsyncEngine, req: Request) -> bool:
    """The broker did not acknowledge: nothing of the request will ever be delivered. False
    when it had been accepted already (its `complete` committed)."""
    async with engine.begin() as conn:
        aborted = await _abort_batches(conn, [req.batch_id], expired_only=False)
        await conn.execute(
            sql(
                "DELETE FROM idempotency_keys WHERE desk = :desk AND key = :key "
                "AND batch_id = :batch AND state = 'in_flight'"
            ),
            {"desk": req.desk, "key": req.idempotency_key, "batch": req.batch_id},
        )
    if aborted:
        return True
    return await state_of(engine, req.batch_id) != BatchState.ACCEPTED


async def abort_stalled(engine: AsyncEngine, batch_ids: Sequence[str]) -> None:
    """Requests answered 503 because the database stalled under their begin, which it may
    still carry out when it wakes: aborted if they are there (nothing of them was published),
    and their Idempotency-Keys freed."""
    async with engine.begin() as conn:
        await _abort_batches(conn, batch_ids, expired_only=False)


async def state_of(engine: AsyncEngine, batch_id: str) -> BatchState | None:
    async with engine.connect() as conn:
        state = await conn.scalar(
            sql("SELECT state FROM batches WHERE batch_id = :batch"), {"batch": batch_id}
        )
    return BatchState(state) if state else None


async def _abort_batches(
    conn: AsyncConnection, batch_ids: Sequence[str], *, expired_only: bool
) -> list[str]:
    rows = await conn.execute(
        sql(
            f"""
            WITH gone AS (
                UPDATE batches SET state = 'aborted', pending_until = NULL
                 WHERE batch_id = ANY(CAST(:ids AS text[])) AND state = 'pending'
                   {"AND pending_until < now()" if expired_only else ""}
                RETURNING batch_id
            ),
            records AS (  -- found through the request's list (batch_messages), by id
                UPDATE messages m SET state = 'aborted', pending_until = NULL, updated_at = now()
                  FROM gone JOIN batch_messages l ON l.batch_id = gone.batch_id
                 WHERE m.message_id = l.message_id AND m.publication = gone.batch_id
                   AND m.publication_kind = 'intake' AND m.state IN ('pending', 'queued')
            ),
            keys AS (
                DELETE FROM idempotency_keys k USING gone
                 WHERE k.batch_id = gone.batch_id AND k.state = 'in_flight'
            )
            SELECT batch_id FROM gone
            """
        ),
        {"ids": list(batch_ids)},
    )
    return [r.batch_id for r in rows]


async def forget_keys(engine: AsyncEngine, retention_s: float, limit: int = 5000) -> int:
    """Delete idempotency keys older than the retention (never one in flight); how many."""
    async with engine.begin() as conn:
        done = await conn.execute(
            sql(
                """
                DELETE FROM idempotency_keys k
                 USING (SELECT desk, key FROM idempotency_keys
                         WHERE created_at < now() - make_interval(secs => :keep)
                           AND (state = 'completed' OR lease_until < now())
                         ORDER BY created_at LIMIT :limit) old
                 WHERE k.desk = old.desk AND k.key = old.key
                """
            ),
            {"keep": retention_s, "limit": limit},
        )
        return int(done.rowcount or 0)


async def sweep_expired(engine: AsyncEngine, limit: int = 500) -> int:
    """Abort requests pending past their lease: their intake died or stalled and never
    answered 202, so their records must never be delivered (a retry may accept them again)."""
    async with engine.begin() as conn:
        expired = [
            r.batch_id
            for r in await conn.execute(
                sql(
                    "SELECT batch_id FROM batches WHERE state = 'pending' "
                    "AND pending_until < now() ORDER BY pending_until LIMIT :limit "
                    "FOR UPDATE SKIP LOCKED"
                ),
                {"limit": limit},
            )
        ]
        if not expired:
            return 0
        return len(await _abort_batches(conn, expired, expired_only=True))


class IntakeStore:
    """The ledger as the intake uses it (ingest.deps.IntakeLedger): acceptance and reads."""

    def __init__(
        self,
        engine: AsyncEngine,
        cipher: PayloadCipher,
        reads: AsyncEngine | None = None,
        *,
        timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        # The desks' reads, planned per call (ledger.db.make_engine `custom_plans`).
        self.reads = reads or engine
        # Reads, `begin` and `abort_stalled` give up after this long (TimeoutError: the
        # database is away);
        # `complete`, `abort` and `state_of` never do: after the publish, the outcome of an
        # acceptance must be learnt, not guessed.
        self.timeout_s = timeout_s

    def payload_cipher(self) -> PayloadCipher | None:
        """The key a big batch's payloads are sealed under where it is prepared (`Columns`)."""
        return self.cipher

    async def begin(self, req: Request) -> Begun:
        async with asyncio.timeout(self.timeout_s):
            return await begin(self.engine, req, self.cipher)

    async def complete(self, req: Request, actor: Actor, new: int) -> bool:
        return await complete(self.engine, req, actor, new)

    async def abort(self, req: Request) -> bool:
        return await abort(self.engine, req)

    async def abort_stalled(self, batch_ids: Sequence[str]) -> None:
        async with asyncio.timeout(self.timeout_s):
            await abort_stalled(self.engine, batch_ids)

    async def state_of(self, batch_id: str) -> BatchState | None:
        return await state_of(self.engine, batch_id)

    async def get_batch(self, batch_id: str, desk: str | None) -> reads.Batch | None:
        async with asyncio.timeout(self.timeout_s):
            return await reads.get_batch(self.reads, batch_id, desk)

    async def get_message(self, message_id: str, desk: str | None) -> reads.Message | None:
        async with asyncio.timeout(self.timeout_s):
            return await reads.get_message(self.reads, message_id, desk)

    async def open_work(self) -> reads.OpenWork:
        async with asyncio.timeout(self.timeout_s):
            return await reads.open_work(self.engine)

    async def ping(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await reads.ping(self.engine)

    async def upstream_view(self) -> UpstreamView:
        async with asyncio.timeout(self.timeout_s):
            return await upstream.read_view(self.engine)
