"""Idempotency keys expire (ETRM_IDEMPOTENCY_RETENTION_H): an index for the expiry job.

Expand-only: the previous release runs unchanged against it (schema_compatibility row).

Revision ID: 0005_idempotency_retention
Revises: 0004_schema_compatibility
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_idempotency_retention"
down_revision = "0004_schema_compatibility"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("idempotency_keys_created", "idempotency_keys", ["created_at"])
    op.execute(
        sa.text(
            "INSERT INTO schema_compatibility (revision, serves_code_at) VALUES (:r, :serves)"
        ).bindparams(r=revision, serves=down_revision)
    )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM schema_compatibility WHERE revision = :r").bindparams(r=revision)
    )
    op.drop_index("idempotency_keys_created", table_name="idempotency_keys")
