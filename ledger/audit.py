"""The tamper-evident audit trail: one append-only row per message state change and per
operator action, each chained to the previous one by SHA-256 over a canonical encoding.

Rules kept here:
- rows are appended under one transaction-scoped advisory lock, so the chain has one order;
- the hash covers every field of the row plus the previous hash, so changing, removing or
  reordering any row breaks verification from that row on;
- the database refuses UPDATE, DELETE and TRUNCATE on the table (triggers, migration 0001).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.records import iso_z

GENESIS = "0" * 64
_LOCK_KEY = 0x45545241554449  # "ETRAUDI": one chain, one writer at a time


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it: a trader or operator (from their token), a worker, or the system."""

    kind: str  # 'trader', 'operator', 'worker', 'system'
    name: str
    desk: str | None = None
    token_id: str | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    actor: Actor
    action: str
    state: str | None = None
    message_id: str | None = None
    batch_id: str | None = None
    subject_id: str | None = None
    detail: str | None = None


_COLUMNS = (
    "seq",
    "at",
    "actor_kind",
    "actor",
    "desk",
    "token_id",
    "source_address",
    "action",
    "state",
    "message_id",
    "batch_id",
    "subject_id",
    "detail",
    "prev_hash",
    "hash",
)


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 over the canonical encoding of every field but `hash`, previous hash included."""
    fields = [row[c] for c in _COLUMNS[:-1]]
    fields[1] = iso_z(fields[1]) if isinstance(fields[1], datetime) else fields[1]
    return hashlib.sha256(orjson.dumps(fields)).hexdigest()


async def append(conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
    """Append events to the chain inside the caller's transaction."""
    if not events:
        return
    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    last = (
        await conn.execute(text("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"))
    ).first()
    seq, prev = (last.seq, last.hash) if last is not None else (0, GENESIS)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for event in events:
        seq += 1
        row = {
            "seq": seq,
            "at": now,
            "actor_kind": event.actor.kind,
            "actor": event.actor.name,
            "desk": event.actor.desk,
            "token_id": event.actor.token_id,
            "source_address": event.actor.address,
            "action": event.action,
            "state": event.state,
            "message_id": event.message_id,
            "batch_id": event.batch_id,
            "subject_id": event.subject_id,
            "detail": event.detail,
            "prev_hash": prev,
        }
        row["hash"] = prev = row_hash(row)
        rows.append(row)
    await conn.execute(
        text(
            """
            INSERT INTO audit_log (seq, at, actor_kind, actor, desk, token_id, source_address,
                action, state, message_id, batch_id, subject_id, detail, prev_hash, hash)
            SELECT * FROM unnest(
                CAST(:seq AS bigint[]), CAST(:at AS timestamptz[]), CAST(:actor_kind AS text[]),
                CAST(:actor AS text[]), CAST(:desk AS text[]), CAST(:token_id AS text[]),
                CAST(:source_address AS text[]), CAST(:action AS text[]),
                CAST(:state AS text[]), CAST(:message_id AS text[]), CAST(:batch_id AS text[]),
                CAST(:subject_id AS text[]), CAST(:detail AS text[]),
                CAST(:prev_hash AS text[]), CAST(:hash AS text[]))
            """
        ),
        {column: [row[column] for row in rows] for column in _COLUMNS},
    )


async def record(engine: AsyncEngine, events: Sequence[AuditEvent]) -> None:
    async with engine.begin() as conn:
        await append(conn, events)


def state_events(
    actor: Actor,
    state: str,
    message_ids: Iterable[str],
    *,
    batch_id: str | None = None,
    detail: str | None = None,
) -> list[AuditEvent]:
    return [
        AuditEvent(
            actor, f"message.{state}", state=state, message_id=m, batch_id=batch_id, detail=detail
        )
        for m in message_ids
    ]


@dataclass(frozen=True, slots=True)
class Verification:
    rows: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


async def verify(engine: AsyncEngine, page: int = 5000) -> Verification:
    """Walk the whole chain; name the first row that does not verify."""
    prev, expected_seq, count = GENESIS, 1, 0
    async with engine.connect() as conn:
        after = 0
        while True:
            result = await conn.execute(
                text(
                    f"SELECT {', '.join(_COLUMNS)} FROM audit_log WHERE seq > :after "
                    "ORDER BY seq LIMIT :page"
                ),
                {"after": after, "page": page},
            )
            rows = [dict(r._mapping) for r in result]
            if not rows:
                break
            for row in rows:
                count += 1
                if row["seq"] != expected_seq:
                    return Verification(
                        count, after, prev, expected_seq, f"row {expected_seq} is missing"
                    )
                if row["prev_hash"] != prev:
                    return Verification(count, after, prev, row["seq"], "previous-hash link broken")
                if row_hash(row) != row["hash"]:
                    return Verification(
                        count, after, prev, row["seq"], "row content does not match its hash"
                    )
                prev, after, expected_seq = row["hash"], row["seq"], expected_seq + 1
    return Verification(count, after, prev, None, None)


# -- signed checkpoints ------------------------------------------------------------------------


def checkpoint_message(seq: int, head_hash: str) -> bytes:
    return f"etrm-audit-checkpoint/v1:{seq}:{head_hash}".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


async def write_checkpoint(engine: AsyncEngine, signer: Ed25519PrivateKey) -> int | None:
    """Sign the current head; the key stays with the process, only the signature is stored."""
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        head = (
            await conn.execute(text("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"))
        ).first()
        if head is None:
            return None
        signature = signer.sign(checkpoint_message(head.seq, head.hash)).hex()
        await conn.execute(
            text(
                "INSERT INTO audit_checkpoints (seq, head_hash, key_id, signature) "
                "VALUES (:seq, :hash, :kid, :sig) ON CONFLICT (seq) DO NOTHING"
            ),
            {
                "seq": head.seq,
                "hash": head.hash,
                "kid": key_id(signer.public_key()),
                "sig": signature,
            },
        )
        return int(head.seq)


async def verify_checkpoints(
    engine: AsyncEngine, public: Ed25519PublicKey
) -> tuple[int, list[str]]:
    """Every checkpoint's signature, and its hash against the chain row it names."""
    problems: list[str] = []
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT c.seq, c.head_hash, c.signature, a.hash AS chain_hash "
                    "FROM audit_checkpoints c LEFT JOIN audit_log a USING (seq) ORDER BY c.seq"
                )
            )
        ).all()
    for row in rows:
        try:
            public.verify(bytes.fromhex(row.signature), checkpoint_message(row.seq, row.head_hash))
        except (InvalidSignature, ValueError):
            problems.append(f"checkpoint {row.seq}: signature does not verify")
            continue
        if row.chain_hash != row.head_hash:
            problems.append(
                f"checkpoint {row.seq}: chain row {row.seq} no longer has the signed hash"
            )
    return len(rows), problems
