"""Least privilege in PostgreSQL (migration 0006, deploy/postgres/roles.sql): the whole pipeline
runs as a login role that is only a member of `etrm_writer`, and that role, tried as an
attacker holding the application's database password would, cannot rewrite, delete or truncate
the audit trail, cannot disable its triggers, and cannot remove a checkpoint."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from ledger import audit
from ledger.db import make_engine
from schemas import samples
from tests.conftest import (
    TEMPLATE_DB,
    Infra,
    Pipeline,
    PipelineFactory,
    _admin,
    _database_url,
    submit_batch,
)

pytestmark = pytest.mark.integration
AUDIT_TABLES = {"audit_log", "audit_checkpoints"}


@pytest.fixture
async def app_role(infra: Infra) -> AsyncIterator[str]:
    name = f"etrm_app_{uuid.uuid4().hex[:8]}"
    await _admin(infra.server_url, f"CREATE ROLE {name} LOGIN IN ROLE etrm_writer")
    try:
        yield name
    finally:
        await _admin(
            infra.server_url,
            f"DROP OWNED BY {name} CASCADE",
            f"DROP ROLE IF EXISTS {name}",
        )


async def test_the_pipeline_runs_as_the_application_role_and_cannot_touch_the_audit_trail(
    pipeline_factory: PipelineFactory, app_role: str
) -> None:
    pipe: Pipeline = await pipeline_factory(database_user=app_role)
    assert make_url(pipe.settings.database_url).username == app_role
    client = pipe.client()
    run = samples.run_id()
    batch = await submit_batch(
        client, run, [samples.otc_confirmation(run, f"ROLE-{i:05d}") for i in range(3)]
    )
    assert batch.status_code == 202, batch.text
    final = await pipe.wait_final(client, batch.json()["batch_id"])
    assert {m["state"] for m in final["messages"]} == {"delivered"}

    engine = make_engine(pipe.settings.database_url)  # the application's own login
    try:
        await audit.sequence_all(engine)  # the sequencer's one-time UPDATE is allowed
        assert (await audit.verify(engine)).ok
        async with engine.connect() as conn:
            tables = (
                (
                    await conn.execute(
                        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                    )
                )
                .scalars()
                .all()
            )
            unguarded = [
                t
                for t in tables
                if not (
                    await conn.execute(
                        text("SELECT has_table_privilege('etrm_writer', :t, 'SELECT')"),
                        {"t": f"public.{t}"},
                    )
                ).scalar()
            ]
            assert unguarded == [], "a table the migrations did not grant on"
            owners = (
                (
                    await conn.execute(
                        text(
                            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
                        )
                    )
                )
                .scalars()
                .all()
            )
            assert app_role not in owners
        attacks = [
            "UPDATE audit_log SET detail = 'nothing' WHERE id = (SELECT min(id) FROM audit_log)",
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
            "ALTER TABLE audit_log DISABLE TRIGGER ALL",
            "SET session_replication_role = replica",
            "DELETE FROM audit_checkpoints",
            "UPDATE audit_checkpoints SET signature = ''",
            "DROP TABLE audit_log",
            "CREATE TABLE audit_log_copy (id bigint)",
        ]
        refused = []
        for attack in attacks:
            try:
                async with engine.begin() as conn:
                    await conn.execute(text(attack))
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or getattr(
                    getattr(exc.orig, "__cause__", None), "sqlstate", None
                )
                refused.append((attack, code))
            else:
                pytest.fail(f"the application role could: {attack}")
        # 42501 insufficient_privilege (or must-be-owner) for every one of them.
        assert {code for _, code in refused} == {"42501"}, refused
        assert (await audit.verify(engine)).ok
    finally:
        await engine.dispose()


async def test_the_migration_grants_the_writer_role_nothing_more_on_the_audit_tables(
    infra: Infra,
) -> None:
    engine = create_async_engine(_database_url(infra.server_url, TEMPLATE_DB))
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT table_name, privilege_type "
                        "FROM information_schema.role_table_grants "
                        "WHERE grantee = 'etrm_writer' "
                        "AND table_name IN ('audit_log', 'audit_checkpoints') ORDER BY 1, 2"
                    )
                )
            ).all()
            columns = (
                (
                    await conn.execute(
                        text(
                            "SELECT column_name FROM information_schema.column_privileges "
                            "WHERE grantee = 'etrm_writer' AND table_name = 'audit_log' "
                            "AND privilege_type = 'UPDATE' ORDER BY 1"
                        )
                    )
                )
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    assert sorted(map(tuple, rows)) == [
        ("audit_checkpoints", "INSERT"),
        ("audit_checkpoints", "SELECT"),
        ("audit_log", "INSERT"),
        ("audit_log", "SELECT"),
    ]
    assert columns == ["hash", "prev_hash", "seq"]
    assert {r[0] for r in rows} == AUDIT_TABLES
