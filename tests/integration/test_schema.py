"""The migrations build exactly what ledger/tables.py says the database holds."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

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
