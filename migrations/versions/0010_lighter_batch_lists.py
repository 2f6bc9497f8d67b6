"""A batch's list of records without the two per-row costs nothing needs: the index
`batch_messages_message` and the foreign key `batch_messages_batch_id_fkey`.

Every record accepted writes one `batch_messages` row, in the statement that writes its batch row
(ledger.acceptance, the `batch` and `listed` parts of one INSERT). Measured on the embedded
Postgres, alternating 1,000-record acceptances between a database with each and one without
(60 each): the index cost ~3 ms of the ~31 ms that recording the request takes, the foreign
key's check (a trigger per row, each looking the batch row up again) another ~3 ms.
- `batch_messages_message` (message_id): no statement looks a batch up by one of its records.
  The batch read (ledger.reads.BATCH_READ) goes by batch id, the primary key.
- The foreign key to `batches`: rows are written only by the statement that inserts their batch
  row, and removed only with it (`_undo_fresh`, one statement); no statement deletes a batch.
  What it guarded, a list row without its batch, no statement can make.

Expand-only for the previous release: it runs unchanged without them (schema_compatibility
row); downgrade builds them again.

Revision ID: 0010_lighter_batch_lists
Revises: 0009_fewer_message_indexes
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_lighter_batch_lists"
down_revision = "0009_fewer_message_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("batch_messages_message", table_name="batch_messages")
    op.drop_constraint("batch_messages_batch_id_fkey", "batch_messages", type_="foreignkey")
    op.execute(
        sa.text(
            "INSERT INTO schema_compatibility (revision, serves_code_at) VALUES (:r, :serves)"
        ).bindparams(r=revision, serves=down_revision)
    )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM schema_compatibility WHERE revision = :r").bindparams(r=revision)
    )
    op.create_foreign_key(
        "batch_messages_batch_id_fkey", "batch_messages", "batches", ["batch_id"], ["batch_id"]
    )
    op.create_index("batch_messages_message", "batch_messages", ["message_id"])
