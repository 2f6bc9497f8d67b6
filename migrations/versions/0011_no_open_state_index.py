"""Drop `messages_open` (state, for records queued or delivering): an index entry written twice
per record delivered, for one read a scrape makes.

A change of a record's state is never a HOT update, so each one adds an entry to every index of
`messages` whose predicate the new row meets: `messages_open` took one when an acceptance
completed (pending → queued) and one when a worker claimed the record (→ delivering). The only
statements reading by it find the oldest record still queued or delivering
(ledger.reads.open_work, every scrape and readiness report; the console's overview); they are
answered through `messages_contract_open` (desk, contract, accept_seq for every open record —
queued and delivering included), whose predicate theirs implies, without reading delivered
records (tests/integration/test_ledger_scenarios.py checks the plan).

Expand-only for the previous release: it runs unchanged without it (schema_compatibility row);
downgrade builds it again.

Revision ID: 0011_no_open_state_index
Revises: 0010_lighter_batch_lists
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_no_open_state_index"
down_revision = "0010_lighter_batch_lists"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("messages_open", table_name="messages")
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
        "CREATE INDEX messages_open ON messages (state) WHERE state IN ('queued', 'delivering')"
    )
