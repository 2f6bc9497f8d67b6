"""Rolling upgrades: which older code a database revision still serves.

A migration that only adds (new tables, nullable columns, indexes) inserts a row
(its revision, the revision before it): processes still running the previous release accept the
database one migration ahead while the new release rolls out. A migration that removes or
changes what old code reads inserts nothing, and old processes refuse to start against it.

Revision ID: 0004_schema_compatibility
Revises: 0003_upstream_circuit
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_schema_compatibility"
down_revision = "0003_upstream_circuit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "schema_compatibility",
        sa.Column("revision", sa.Text, primary_key=True),
        sa.Column("serves_code_at", sa.Text, nullable=False),
    )
    op.bulk_insert(table, [{"revision": revision, "serves_code_at": down_revision}])


def downgrade() -> None:
    op.drop_table("schema_compatibility")
