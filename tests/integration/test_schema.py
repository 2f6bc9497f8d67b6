"""The migrations build exactly what ledger/tables.py says the database holds."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.db import SchemaAhead, SchemaBehind, alembic_config, ensure_schema_current
from ledger.tables import metadata
from tests.conftest import Infra, fresh_database


async def test_migrated_database_matches_the_table_metadata(infra: Infra) -> None:
    engine = create_async_engine(await fresh_database(infra))

    def differences(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": False}
        )
        found = compare_metadata(context, metadata)
        # alembic's own bookkeeping table is not the ledger's
        return [d for d in found if "alembic_version" not in repr(d)]

    try:
        async with engine.connect() as conn:
            found = await conn.run_sync(differences)
    finally:
        await engine.dispose()
    assert found == []


async def test_a_rolling_upgrade_gate_accepts_one_declared_migration_ahead(infra: Infra) -> None:
    """Old processes keep running while the next release migrates, if (and only if) that
    migration declares it still serves their code; a database behind is always refused."""
    url = await fresh_database(infra)
    engine = create_async_engine(url)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()

    async def stamp(revision: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})

    try:
        await ensure_schema_current(engine)
        await stamp("9999_next_release")
        with pytest.raises(SchemaAhead, match="9999_next_release"):
            await ensure_schema_current(engine)
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO schema_compatibility VALUES ('9999_next_release', :head)"),
                {"head": head},
            )
        await ensure_schema_current(engine)  # declared: accepted
        await stamp("0003_upstream_circuit")
        with pytest.raises(SchemaBehind, match="run `etrm-sync migrate`"):
            await ensure_schema_current(engine)
    finally:
        await engine.dispose()


# Every index of `messages`, with the statement that reads through it. A record is written at
# least three times (accepted, leased, settled) and a change of state is not a HOT update, so
# each write adds an entry to every index of the table: an index nobody reads is paid for on
# every record. Migration 0009 dropped two such (by run and desk, by publication), 0011 one
# by state that only the oldest-undelivered read used.
MESSAGE_INDEXES = {
    "messages_pkey": "every lookup by message id",
    "messages_identity_revision": "identity and revision uniqueness (#6), highest revision taken",
    "messages_contract_open": "earlier open records of a contract (claims, parked records); "
    "the oldest undelivered record (open work, console; migration 0011)",
    "messages_pending_publication": "completing or aborting an acceptance of a release that "
    "wrote its records pending (tables.accepting_sql)",
    "messages_parked": "parked records behind a dead letter (continuations, dead-letter list)",
}


async def test_messages_carries_only_the_indexes_its_statements_read(infra: Infra) -> None:
    engine = create_async_engine(await fresh_database(infra))
    try:
        async with engine.connect() as conn:
            found = (
                await conn.execute(
                    text("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")
                )
            ).scalars()
            names = set(found)
    finally:
        await engine.dispose()
    assert names == set(MESSAGE_INDEXES)


async def test_a_batch_list_row_costs_one_index_entry_and_no_trigger(infra: Infra) -> None:
    """Every record accepted writes a `batch_messages` row in the statement that writes its
    batch row. Its primary key (batch id, position) is what the batch read goes by; an index by
    message id (read by nothing) and a foreign key to `batches` (a trigger per row, for a
    row no statement can orphan) cost ~3 ms each per 1,000 records (migration 0010)."""
    engine = create_async_engine(await fresh_database(infra))
    try:
        async with engine.connect() as conn:
            indexes = set(
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE tablename = 'batch_messages'")
                    )
                ).scalars()
            )
            triggers = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'batch_messages'::regclass"
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert indexes == {"batch_messages_pkey"}
    assert triggers == 0
