"""The tamper-evident audit trail: one append-only row per state change and per operator
action, chained by SHA-256 in the order a single sequencer gives them.

Rules kept here (as a transparency log's sequencer does, e.g. Trillian):
- whoever acts appends its rows inside its own transaction, without a lock and without waiting
  for anyone; a row is durable the moment that transaction commits;
- one sequencer at a time (a transaction-scoped advisory lock: any process may take the turn)
  gives committed rows their sequence number and chain hash, in batches; a row must be
  sequenced within the merge delay, and `verify` reports any that is not;
- the hash covers every field of the row plus the previous hash, so changing, removing,
  inserting or reordering any sequenced row breaks verification from that row on;
- the database refuses UPDATE (except the sequencer's one write of the chain columns), DELETE
  and TRUNCATE on the table (triggers, migrations 0001 and 0002).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.db import array_literal, sql
from ledger.rows import Actor, AuditEvent
from schemas.records import iso_z
from schemas.text import cap_text

GENESIS = "0" * 64
_SEQUENCER_LOCK = 0x45545241554449  # "ETRAUDI": one sequencer at a time
DETAIL_LIMIT = 4096


_CONTENT = (
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
)
_HASHED = ("seq", "at", *_CONTENT, "prev_hash")


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 over the canonical encoding of the row's place (seq), time, content and the
    previous hash."""
    fields = [row[c] for c in _HASHED]
    fields[1] = iso_z(fields[1]) if isinstance(fields[1], datetime) else fields[1]
    return hashlib.sha256(orjson.dumps(fields)).hexdigest()


def _content(event: AuditEvent) -> dict[str, Any]:
    return {
        "actor_kind": event.actor.kind,
        "actor": cap_text(event.actor.name, 256),
        "desk": event.actor.desk,
        "token_id": event.actor.token_id,
        "source_address": event.actor.address,
        "action": event.action,
        "state": event.state,
        "message_id": event.message_id,
        "batch_id": event.batch_id,
        "subject_id": event.subject_id,
        "detail": cap_text(event.detail, DETAIL_LIMIT) if event.detail is not None else None,
    }


def insert_statement(events: Sequence[AuditEvent], where: str = "") -> tuple[str, dict[str, Any]]:
    """The INSERT of `events` (one statement, no lock) and its parameters, named `audit_*`: to
    run alone (`append`) or as a CTE of a caller's statement, `where` deciding in the same
    snapshot whether the rows go in."""
    rows = [_content(e) for e in events]
    arrays = ", ".join(f"CAST(:audit_{column} AS text[])" for column in _CONTENT)
    columns = ", ".join(_CONTENT)
    statement = f"""
        INSERT INTO audit_log (at, {columns})
        SELECT CAST(:audit_at AS timestamptz), e.* FROM unnest({arrays}) AS e({columns}) {where}
    """
    params = {f"audit_{column}": [row[column] for row in rows] for column in _CONTENT}
    return statement, {"audit_at": datetime.now(UTC), **params}


async def append(conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
    """Append events inside the caller's transaction: one statement, no lock."""
    if not events:
        return
    statement, params = insert_statement(events)
    await conn.execute(sql(statement), params)


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


# -- the sequencer ---------------------------------------------------------------------------


async def sequence(engine: AsyncEngine, limit: int = 5000, *, wait: bool = False) -> int:
    """Give committed, unsequenced rows their place in the chain; 0 when nothing is waiting,
    or (unless `wait`) when another process holds the sequencer's turn."""
    async with engine.begin() as conn:
        if wait:
            await conn.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": _SEQUENCER_LOCK})
        elif not await conn.scalar(
            sql("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _SEQUENCER_LOCK}
        ):
            return 0
        result = await conn.execute(
            sql(
                f"SELECT id, at, {', '.join(_CONTENT)} FROM audit_log WHERE hash IS NULL "
                "ORDER BY id LIMIT :limit"
            ),
            {"limit": limit},
        )
        # Rows as dicts by zipping the column names once (a `_mapping` per row built a keys
        # view each time: ~1.6 % of a delivering worker's CPU in a py-spy profile).
        columns = tuple(result.keys())
        waiting = [dict(zip(columns, r, strict=True)) for r in result]
        if not waiting:
            return 0
        head = await _chain_head(conn)
        seq, prev = head if head is not None else (0, GENESIS)
        for row in waiting:
            seq += 1
            row["seq"], row["prev_hash"] = seq, prev
            row["hash"] = prev = row_hash(row)
        await conn.execute(
            sql(
                """
                UPDATE audit_log a SET seq = s.seq, prev_hash = s.prev_hash, hash = s.hash
                  FROM unnest(CAST(CAST(:ids AS text) AS bigint[]),
                              CAST(CAST(:seqs AS text) AS bigint[]),
                              CAST(CAST(:prevs AS text) AS text[]),
                              CAST(CAST(:hashes AS text) AS text[]))
                       AS s(id, seq, prev_hash, hash)
                 WHERE a.id = s.id AND a.hash IS NULL
                """
            ),
            # Arrays as their text (db.array_literal): asyncpg would encode up to 4 x 5,000
            # elements one by one on the worker's event loop.
            {
                "ids": array_literal(r["id"] for r in waiting),
                "seqs": array_literal(r["seq"] for r in waiting),
                "prevs": array_literal(r["prev_hash"] for r in waiting),
                "hashes": array_literal(r["hash"] for r in waiting),
            },
        )
        return len(waiting)


async def sequence_all(engine: AsyncEngine) -> int:
    """Sequence until nothing is waiting (tests, `audit verify`, shutdown), waiting for a
    sequencer running elsewhere to finish its turn rather than skipping it."""
    total = 0
    while True:
        done = await sequence(engine, wait=True)
        if done == 0:
            return total
        total += done


@dataclass(frozen=True, slots=True)
class Verification:
    rows: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    problem: str | None
    unsequenced_late: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None and self.unsequenced_late == 0


async def verify(
    engine: AsyncEngine, *, merge_delay_s: float = 60.0, page: int = 5000
) -> Verification:
    """Walk the whole chain; name the first row that does not verify, and count rows left
    unsequenced longer than the merge delay."""
    prev, expected_seq, count = GENESIS, 1, 0
    async with engine.connect() as conn:
        after = 0
        while True:
            result = await conn.execute(
                sql(
                    f"SELECT {', '.join(_HASHED)}, hash FROM audit_log WHERE seq > :after "
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
        late = await conn.scalar(
            sql(
                "SELECT count(*) FROM audit_log WHERE hash IS NULL "
                "AND at < now() - make_interval(secs => :delay)"
            ),
            {"delay": merge_delay_s},
        )
    return Verification(
        count,
        after,
        prev,
        None,
        f"{late} row(s) unsequenced past the merge delay" if late else None,
        int(late or 0),
    )


# -- signed checkpoints ------------------------------------------------------------------------


def checkpoint_message(seq: int, head_hash: str) -> bytes:
    return f"etrm-audit-checkpoint/v1:{seq}:{head_hash}".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


async def _chain_head(conn: AsyncConnection) -> tuple[int, str] | None:
    """The last sequenced entry's number and hash (None before the first)."""
    head = (
        await conn.execute(
            sql("SELECT seq, hash FROM audit_log WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
        )
    ).first()
    return (int(head.seq), str(head.hash)) if head is not None else None


EXTERNAL_FILE = "audit-checkpoints.jsonl"


def append_external(directory: Path, checkpoint: dict[str, Any]) -> None:
    """One signed checkpoint, appended (and synced) to a file outside the database, where its
    administrator cannot quietly delete it together with the rows it vouches for."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / EXTERNAL_FILE).open("ab") as out:
        out.write(orjson.dumps(checkpoint) + b"\n")
        out.flush()
        os.fsync(out.fileno())


def read_external(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The checkpoints kept outside the database, and what could not be read of them."""
    path = directory / EXTERNAL_FILE
    if not path.exists():
        return [], [f"no external checkpoint file at {path}"]
    found, problems = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            item = orjson.loads(line)
            found.append(
                {
                    "seq": int(item["seq"]),
                    "head_hash": str(item["head_hash"]),
                    "signature": str(item["signature"]),
                }
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            problems.append(f"external checkpoint file line {number} is unreadable")
    return found, problems


async def write_checkpoint(
    engine: AsyncEngine, signer: Ed25519PrivateKey, external_dir: Path | None = None
) -> int | None:
    """Sign the head of the sequenced chain; the key stays with the process, only the
    signature is stored — in the database and, with `external_dir`, in a file beside it."""
    async with engine.begin() as conn:
        await conn.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": _SEQUENCER_LOCK})
        head = await _chain_head(conn)
        if head is None:
            return None
        seq, head_hash = head
        signature = signer.sign(checkpoint_message(seq, head_hash)).hex()
        kid = key_id(signer.public_key())
        inserted = await conn.scalar(
            sql(
                "INSERT INTO audit_checkpoints (seq, head_hash, key_id, signature) "
                "VALUES (:seq, :hash, :kid, :sig) ON CONFLICT (seq) DO NOTHING RETURNING seq"
            ),
            {"seq": seq, "hash": head_hash, "kid": kid, "sig": signature},
        )
    if inserted is not None and external_dir is not None:
        checkpoint = {"seq": seq, "head_hash": head_hash, "key_id": kid, "signature": signature}
        append_external(external_dir, {**checkpoint, "at": iso_z(datetime.now(UTC))})
    return seq


async def verify_checkpoints(
    engine: AsyncEngine,
    public: Ed25519PublicKey,
    *,
    max_age_s: float | None = None,
    external_dir: Path | None = None,
) -> tuple[int, list[str]]:
    """Every checkpoint's signature, and its hash against the chain row it names; with
    `max_age_s`, chain rows older than that must be covered by a signed checkpoint (no
    checkpoint, a stale one, or a chain extended past it unsigned all fail); with
    `external_dir`, every checkpoint kept outside the database must still hold in it."""
    problems: list[str] = []
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sql(
                    "SELECT c.seq, c.head_hash, c.signature, a.hash AS chain_hash "
                    "FROM audit_checkpoints c LEFT JOIN audit_log a USING (seq) ORDER BY c.seq"
                )
            )
        ).all()
        uncovered = (
            await conn.scalar(
                sql(
                    "SELECT max(seq) FROM audit_log WHERE seq IS NOT NULL "
                    "AND at < now() - make_interval(secs => :age)"
                ),
                {"age": max_age_s},
            )
            if max_age_s is not None
            else None
        )
        external, unreadable = read_external(external_dir) if external_dir else ([], [])
        chain = {
            r.seq: r.hash
            for r in await conn.execute(
                sql("SELECT seq, hash FROM audit_log WHERE seq = ANY(CAST(:seqs AS bigint[]))"),
                {"seqs": [e["seq"] for e in external]},
            )
        }
    signed = 0
    for row in rows:
        if not _signed(public, row.seq, row.head_hash, row.signature):
            problems.append(f"checkpoint {row.seq}: signature does not verify")
            continue
        signed = max(signed, row.seq)
        if row.chain_hash != row.head_hash:
            problems.append(
                f"checkpoint {row.seq}: chain row {row.seq} no longer has the signed hash"
            )
    if uncovered is not None and uncovered > signed:
        problems.append(
            f"rows {signed + 1}..{uncovered} are older than {max_age_s:g} s and no signed "
            "checkpoint covers them (checkpoints deleted, stale, or the chain rewritten past them)"
        )
    problems.extend(unreadable)
    in_database = {row.seq: row.head_hash for row in rows}
    for item in external:
        seq = item["seq"]
        if not _signed(public, seq, item["head_hash"], item["signature"]):
            problems.append(f"external checkpoint {seq}: signature does not verify")
        elif chain.get(seq) != item["head_hash"]:
            problems.append(f"external checkpoint {seq}: chain row {seq} no longer has that hash")
        elif in_database.get(seq) != item["head_hash"]:
            problems.append(f"external checkpoint {seq}: missing from the database")
    return len(rows), problems


def _signed(public: Ed25519PublicKey, seq: int, head_hash: str, signature: str) -> bool:
    try:
        public.verify(bytes.fromhex(signature), checkpoint_message(seq, head_hash))
    except (InvalidSignature, ValueError):
        return False
    return True
