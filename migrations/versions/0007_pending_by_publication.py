"""Records being accepted, by the request that accepts them: a small partial index.

Completing or aborting an acceptance touches `messages WHERE publication = :batch AND state =
'pending'`. Without statistics yet (a new database, before autovacuum first analyzes it), the
planner answered that with a bitmap AND of `messages_publication` and the whole of
`messages_contract_open` (every open record: 75,519 index entries read, 5.2 ms, for one
single-record request, seen with auto_explain after one desk's big batches). Pending rows
exist only while a request is being accepted, so this index stays a few entries long and is
the obvious plan with or without statistics.

Expand-only: the previous release runs unchanged against it (schema_compatibility row).

Revision ID: 0007_pending_by_publication
Revises: 0006_application_role
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_pending_by_publication"
down_revision = "0006_application_role"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "messages_pending_publication",
        "messages",
        ["publication"],
        postgresql_where=sa.text("state = 'pending'"),
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
    op.drop_index("messages_pending_publication", table_name="messages")
