"""The upstream's circuit breaker and maintenance windows (issue #8).

- upstream_circuit: one row per upstream ('etrm'), shared by every worker of the group;
  closed -> open (after failures, or a maintenance the upstream announced) -> half_open (one
  worker probes) -> closed.
- maintenance_windows: declared ahead by operators; no request is sent inside one.

Revision ID: 0003_upstream_circuit
Revises: 0002_delivery_protocol
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_upstream_circuit"
down_revision = "0002_delivery_protocol"
branch_labels = None
depends_on = None


def _at(name: str, *, nullable: bool = True, now: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        name,
        sa.TIMESTAMP(timezone=True),
        nullable=nullable,
        server_default=sa.func.now() if now else None,
    )


def upgrade() -> None:
    op.create_table(
        "upstream_circuit",
        sa.Column("upstream", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False, server_default="closed"),
        _at("since", nullable=False, now=True),
        sa.Column("reason", sa.Text),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        _at("window_started"),
        _at("next_probe_at"),
        sa.Column("probe_owner", sa.Text),
        _at("probe_until"),
        sa.CheckConstraint(
            "state IN ('closed', 'half_open', 'open')", name="upstream_circuit_state_check"
        ),
    )
    op.execute("INSERT INTO upstream_circuit (upstream) VALUES ('etrm')")
    op.create_table(
        "maintenance_windows",
        sa.Column("window_id", sa.Text, primary_key=True),
        _at("starts_at", nullable=False),
        _at("ends_at", nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        _at("created_at", nullable=False, now=True),
        _at("cancelled_at"),
        sa.Column("cancelled_by", sa.Text),
        sa.CheckConstraint("ends_at > starts_at", name="maintenance_windows_span_check"),
    )
    op.create_index(
        "maintenance_windows_current",
        "maintenance_windows",
        ["ends_at"],
        postgresql_where=sa.text("cancelled_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("maintenance_windows")
    op.drop_table("upstream_circuit")
