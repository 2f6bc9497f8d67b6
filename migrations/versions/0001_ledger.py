"""Ledger, batches, idempotency keys, dead letters, holds, replays and the audit trail.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-28
"""

from alembic import op

revision = "0001_ledger"
down_revision = None
branch_labels = None
depends_on = None

STATES = (
    "'queued','delivering','delivered','held','dead_lettered','superseded','released','rejected'"
)


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in DDL.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for statement in APPEND_ONLY:
        op.execute(statement)


DDL = f"""
        CREATE TABLE messages (
            message_id              text PRIMARY KEY,
            desk                    text NOT NULL,
            trader                  text NOT NULL,
            batch_id                text,
            settlement_run_id       text NOT NULL,
            contract_id             text NOT NULL,
            market                  text NOT NULL,
            identity_hash           text NOT NULL,
            revision                integer NOT NULL CHECK (revision >= 1),
            topic                   text NOT NULL,
            state                   text NOT NULL CHECK (state IN ({STATES})),
            attempts                integer NOT NULL DEFAULT 0,
            upstream_transaction_id text,
            last_error              text,
            submitted_position_mwh  numeric(12,3) NOT NULL,
            reconciled_position_mwh numeric(16,3),
            payload                 bytea NOT NULL,
            payload_kid             text NOT NULL,
            trace_id                text NOT NULL,
            source_partition        integer,
            source_offset           bigint,
            first_attempt_at        timestamptz,
            last_attempt_at         timestamptz,
            created_at              timestamptz NOT NULL DEFAULT now(),
            updated_at              timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT messages_identity_revision UNIQUE (identity_hash, revision)
        );
        CREATE INDEX messages_desk_run ON messages (desk, settlement_run_id);
        CREATE INDEX messages_open ON messages (state) WHERE state IN ('queued', 'delivering');

        CREATE TABLE batches (
            batch_id          text PRIMARY KEY,
            desk              text NOT NULL,
            trader            text NOT NULL,
            settlement_run_id text NOT NULL,
            idempotency_key   text NOT NULL,
            record_count      integer NOT NULL,
            trace_id          text NOT NULL,
            created_at        timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE batch_messages (
            batch_id    text NOT NULL REFERENCES batches (batch_id),
            idx         integer NOT NULL,
            message_id  text NOT NULL,
            PRIMARY KEY (batch_id, idx)
        );
        CREATE INDEX batch_messages_message ON batch_messages (message_id);

        CREATE TABLE idempotency_keys (
            desk          text NOT NULL,
            key           text NOT NULL,
            request_hash  text NOT NULL,
            state         text NOT NULL CHECK (state IN ('in_flight', 'completed')),
            lease_until   timestamptz NOT NULL,
            resource_kind text,
            resource_id   text,
            status_url    text,
            created_at    timestamptz NOT NULL DEFAULT now(),
            completed_at  timestamptz,
            PRIMARY KEY (desk, key)
        );

        CREATE TABLE dead_letters (
            dead_letter_id    text PRIMARY KEY,
            message_id        text,
            desk              text,
            settlement_run_id text,
            contract_id       text,
            reason            text NOT NULL CHECK (reason IN (
                'upstream_rejected', 'retries_exhausted', 'invalid_signature',
                'invalid_message', 'token_unavailable', 'drift_rejected')),
            status            text NOT NULL DEFAULT 'open'
                              CHECK (status IN ('open', 'replaying', 'replayed', 'discarded')),
            error_status      integer,
            attempts          integer NOT NULL DEFAULT 0,
            last_error        text,
            first_attempt_at  timestamptz,
            last_attempt_at   timestamptz,
            source_topic      text NOT NULL,
            source_partition  integer NOT NULL,
            source_offset     bigint NOT NULL,
            kafka_key         bytea,
            kafka_value       bytea NOT NULL,
            value_kid         text NOT NULL,
            kafka_headers     jsonb NOT NULL,
            created_at        timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT dead_letters_source UNIQUE (source_topic, source_partition, source_offset)
        );
        CREATE INDEX dead_letters_filter ON dead_letters (desk, reason, created_at);

        CREATE TABLE holds (
            hold_id                 text PRIMARY KEY,
            message_id              text NOT NULL UNIQUE REFERENCES messages (message_id),
            desk                    text NOT NULL,
            contract_id             text NOT NULL,
            submitted_position_mwh  numeric(12,3) NOT NULL,
            reconciled_position_mwh numeric(16,3) NOT NULL,
            variance                numeric(20,6) NOT NULL,
            state                   text NOT NULL DEFAULT 'open'
                                    CHECK (state IN ('open', 'released', 'rejected')),
            created_at              timestamptz NOT NULL DEFAULT now(),
            decided_at              timestamptz,
            decided_by              text,
            decision_reason         text
        );

        CREATE TABLE replays (
            replay_id     text PRIMARY KEY,
            state         text NOT NULL CHECK (state IN ('pending_approval', 'approved', 'running',
                                                         'completed')),
            reason        text NOT NULL,
            requested_by  text NOT NULL,
            requested_desk text NOT NULL,
            approved_by   text,
            approval_reason text,
            item_count    integer NOT NULL,
            desks         text[] NOT NULL,
            lease_until   timestamptz,
            created_at    timestamptz NOT NULL DEFAULT now(),
            approved_at   timestamptz,
            completed_at  timestamptz
        );

        CREATE TABLE replay_items (
            replay_id      text NOT NULL REFERENCES replays (replay_id),
            ord            integer NOT NULL,
            dead_letter_id text NOT NULL REFERENCES dead_letters (dead_letter_id),
            message_id     text NOT NULL,
            state          text NOT NULL DEFAULT 'pending'
                           CHECK (state IN ('pending', 'published', 'skipped')),
            published_at   timestamptz,
            PRIMARY KEY (replay_id, ord)
        );
        CREATE UNIQUE INDEX replay_items_open_dead_letter ON replay_items (dead_letter_id)
            WHERE state = 'pending';

        -- The audit trail: append-only, each row chained to the previous by SHA-256.
        CREATE TABLE audit_log (
            seq            bigint PRIMARY KEY,
            at             timestamptz NOT NULL,
            actor_kind     text NOT NULL,
            actor          text NOT NULL,
            desk           text,
            token_id       text,
            source_address text,
            action         text NOT NULL,
            state          text,
            message_id     text,
            batch_id       text,
            subject_id     text,
            detail         text,
            prev_hash      text NOT NULL,
            hash           text NOT NULL
        );
        CREATE INDEX audit_log_message ON audit_log (message_id, seq) WHERE message_id IS NOT NULL;
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;

        -- Signed (sequence, head hash) pairs; the signing key never enters the database.
        CREATE TABLE audit_checkpoints (
            seq        bigint PRIMARY KEY,
            head_hash  text NOT NULL,
            at         timestamptz NOT NULL DEFAULT now(),
            key_id     text NOT NULL,
            signature  text NOT NULL
        );
                """


def downgrade() -> None:
    op.execute("DROP TABLE audit_checkpoints, audit_log, replay_items, replays")
    op.execute("DROP FUNCTION audit_log_append_only")
    op.execute(
        "DROP TABLE holds, dead_letters, idempotency_keys, batch_messages, batches, messages"
    )


# The database itself refuses to change or remove audit rows, whatever the application does.
APPEND_ONLY = (
    """
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END;
    $$
    """,
    """
    CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()
    """,
    """
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()
    """,
)
