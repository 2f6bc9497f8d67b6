"""Two indexes on `messages` that no statement needs: `messages_desk_run` and
`messages_publication`.

Every record is written three times or more (accepted, leased, settled), and a change of state
is not a HOT update, so each write adds an entry to every index of the table. Read with each
statement of the code at this revision:
- `messages_publication` (publication): every statement that looks records up by publication
  also asks for `state = 'pending'` and has the partial index `messages_pending_publication`
  (0007) for it; a replay's re-queue finds its records by message id.
- `messages_desk_run` (desk, settlement_run_id): nothing filters `messages` by run and desk.
  The contract lookups (desk, contract id, earlier accept_seq, open states) have
  `messages_contract_open`; the console's search (an OR over five columns) and overview (a
  count of every open record) read the table whole either way.

Expand-only for the previous release: it runs unchanged without them (schema_compatibility
row); downgrade builds them again.

Revision ID: 0009_fewer_message_indexes
Revises: 0008_parked_records
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_fewer_message_indexes"
down_revision = "0008_parked_records"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("messages_desk_run", table_name="messages")
    op.drop_index("messages_publication", table_name="messages")
    op.execute(
        sa.text(
            "INSERT INTO schema_compatibility (revision, serves_code_at) VALUES (:r, :serves)"
        ).bindparams(r=revision, serves=down_revision)
    )


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM schema_compatibility WHERE revision = :r").bindparams(r=revision)
    )
    op.create_index("messages_publication", "messages", ["publication"])
    op.create_index("messages_desk_run", "messages", ["desk", "settlement_run_id"])
