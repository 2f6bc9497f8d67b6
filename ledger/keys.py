"""Key rotation for payloads at rest: re-encrypt every row not yet under the active key."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import audit
from ledger.crypto import PayloadCipher
from ledger.db import sql
from ledger.rows import Actor, AuditEvent

# (table, id column, value column, key-id column)
_SEALED = (
    ("messages", "message_id", "payload", "payload_kid"),
    ("dead_letters", "dead_letter_id", "kafka_value", "value_kid"),
)


async def rotate(
    engine: AsyncEngine,
    cipher: PayloadCipher,
    actor: Actor,
    *,
    chunk: int = 500,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table, id_column, value_column, kid_column in _SEALED:
        done = 0
        while True:
            async with engine.begin() as conn:
                rows = (
                    await conn.execute(
                        sql(
                            f"SELECT {id_column}, {kid_column}, {value_column} FROM {table} "
                            f"WHERE {kid_column} <> :active LIMIT :chunk FOR UPDATE SKIP LOCKED"
                        ),
                        {"active": cipher.active_kid, "chunk": chunk},
                    )
                ).all()
                if not rows:
                    break
                ids = [row[0] for row in rows]
                sealed = [
                    cipher.seal(cipher.open(kid, value, row_id), row_id)
                    for row_id, kid, value in rows
                ]
                await conn.execute(
                    sql(
                        f"""
                        UPDATE {table} t SET {value_column} = n.value, {kid_column} = :active
                          FROM unnest(CAST(:ids AS text[]), CAST(:values AS bytea[]))
                               AS n(row_id, value)
                         WHERE t.{id_column} = n.row_id
                        """
                    ),
                    {"ids": ids, "values": sealed, "active": cipher.active_kid},
                )
            done += len(rows)
            if progress:
                progress(table, done)
        counts[table] = done
    await audit.record(
        engine,
        [
            AuditEvent(
                actor,
                "keys.rotated",
                subject_id=cipher.active_kid,
                detail=", ".join(f"{table}: {n} re-encrypted" for table, n in counts.items()),
            )
        ],
    )
    return counts
