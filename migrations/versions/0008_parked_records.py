"""Parked records, by the dead letter they wait behind: a small partial index.

Two statements look for parked records: the continuation job (every worker's housekeeping, a
few times a minute: parked records whose contract has nothing open before them any more) and
the count of records parked behind each dead letter (the operators' dead-letter list). Both
filtered `messages` by `state = 'parked'`, which no index covered: a sequential scan of every
record ever accepted, 24 ms per continuation at ~40,000 rows (pg_stat_statements, bench worker
scenario), growing with the table. Parked records are few at any time, so this index stays
small and both statements read only it.

Expand-only: the previous release runs unchanged against it (schema_compatibility row).

Revision ID: 0008_parked_records
Revises: 0007_pending_by_publication
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_parked_records"
down_revision = "0007_pending_by_publication"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "messages_parked",
        "messages",
        ["parked_behind", "accept_seq"],
        postgresql_where=sa.text("state = 'parked'"),
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
    op.drop_index("messages_parked", table_name="messages")
