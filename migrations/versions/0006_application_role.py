"""Least privilege for the running processes: a group role `etrm_writer` that the intake, the
workers and the operators' commands log in through (a login role the DBA makes a member of it,
deploy/postgres/roles.sql), while migrations run as the schema owner.

What `etrm_writer` may do: read and write the ledger's working tables; on the audit trail only
SELECT, INSERT, and UPDATE of the three columns the sequencer fills once (seq, prev_hash, hash;
the trigger of 0002 refuses any other change and any second sequencing); on the checkpoints only
SELECT and INSERT. Not being the owner, it cannot ALTER the tables, so cannot disable their
triggers; it has no DELETE or TRUNCATE on either audit table.

The role is created when the migrating role may create roles (CREATEROLE or superuser); where it
may not, the migration notes it and grants nothing (create `etrm_writer` first, then migrate).

Expand-only: the previous release runs unchanged against it (schema_compatibility row).

Revision ID: 0006_application_role
Revises: 0005_idempotency_retention
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_application_role"
down_revision = "0005_idempotency_retention"
branch_labels = None
depends_on = None

ROLE = "etrm_writer"
WORKING_TABLES = (
    "messages",
    "batches",
    "batch_messages",
    "idempotency_keys",
    "dead_letters",
    "holds",
    "replays",
    "replay_items",
    "upstream_circuit",
    "maintenance_windows",
)
READ_ONLY_TABLES = ("schema_compatibility", "alembic_version")


def upgrade() -> None:
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                BEGIN
                    CREATE ROLE {ROLE} NOLOGIN;
                EXCEPTION WHEN insufficient_privilege THEN
                    RAISE NOTICE 'cannot create role {ROLE}; create it and migrate again';
                END;
            END IF;
        END $$
        """
    )
    grants = [
        f"GRANT USAGE ON SCHEMA public TO {ROLE}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(WORKING_TABLES)} TO {ROLE}",
        f"GRANT SELECT ON {', '.join(READ_ONLY_TABLES)} TO {ROLE}",
        f"GRANT SELECT, INSERT ON audit_log, audit_checkpoints TO {ROLE}",
        f"GRANT UPDATE (seq, prev_hash, hash) ON audit_log TO {ROLE}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {ROLE}",
    ]
    body = "; ".join(g.replace("'", "''") for g in grants)
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                EXECUTE '{body}';
            END IF;
        END $$
        """
    )
    op.execute(
        sa.text(
            "INSERT INTO schema_compatibility (revision, serves_code_at) VALUES (:r, :serves)"
        ).bindparams(r=revision, serves=down_revision)
    )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM schema_compatibility WHERE revision = :r").bindparams(r=revision)
    )
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ROLE}';
                EXECUTE 'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ROLE}';
            END IF;
        END $$
        """
    )
