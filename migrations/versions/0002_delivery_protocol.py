"""The delivery protocol of issue #6: acceptance before publication, leases with fencing,
outbox dead letters, sequenced audit appends.

- messages: `pending`/`aborted`/`parked` states; the live publication of each record; an
  acceptance sequence; a delivery lease (owner, epoch, expiry); the retry budget spent;
  one accepted record per identity and revision (aborted acceptances excluded).
- batches: `pending` until the broker acknowledged the request, then `accepted` (or `aborted`).
- dead letters: recorded once per cause (`dedupe_key`, replacing the Kafka coordinates, which
  repeat when a topic is recreated), published to the reconciliation topic from the ledger.
- audit_log: rows are appended without a lock and sequenced into the chain afterwards; the
  chain columns may be written once, nothing else may ever change.

Existing rows are carried over: their records were published before they were recorded, so
they count as accepted and their dead letters as published.

Revision ID: 0002_delivery_protocol
Revises: 0001_ledger
Create Date: 2026-12-02
"""

from alembic import op

revision = "0002_delivery_protocol"
down_revision = "0001_ledger"
branch_labels = None
depends_on = None

STATES = (
    "'aborted','delivered','delivering','dead_lettered','held','parked','pending','queued',"
    "'rejected','released','superseded'"
)

UPGRADE = [
    # -- messages ------------------------------------------------------------------------------
    "CREATE SEQUENCE message_accept_seq",
    "ALTER TABLE messages DROP CONSTRAINT messages_state_check",
    f"ALTER TABLE messages ADD CONSTRAINT messages_state_check CHECK (state IN ({STATES}))",
    "ALTER TABLE messages DROP CONSTRAINT messages_identity_revision",
    """
    ALTER TABLE messages
        ADD COLUMN publication text,
        ADD COLUMN publication_kind text NOT NULL DEFAULT 'intake',
        ADD COLUMN accept_seq bigint,
        ADD COLUMN pending_until timestamptz,
        ADD COLUMN lease_owner text,
        ADD COLUMN lease_epoch integer NOT NULL DEFAULT 0,
        ADD COLUMN lease_until timestamptz,
        ADD COLUMN budget_used_s double precision NOT NULL DEFAULT 0,
        ADD COLUMN dead_letter_id text,
        ADD COLUMN parked_behind text,
        ADD COLUMN queued_at timestamptz,
        ADD COLUMN final_at timestamptz
    """,
    """
    UPDATE messages m
       SET publication = coalesce(m.batch_id, m.message_id),
           accept_seq = o.seq,
           queued_at = m.created_at
      FROM (SELECT message_id, nextval('message_accept_seq') AS seq
              FROM (SELECT message_id FROM messages ORDER BY created_at, message_id) ordered) o
     WHERE o.message_id = m.message_id
    """,
    """
    UPDATE messages m SET dead_letter_id = d.dead_letter_id
      FROM (SELECT DISTINCT ON (message_id) message_id, dead_letter_id FROM dead_letters
             WHERE message_id IS NOT NULL ORDER BY message_id, created_at DESC) d
     WHERE d.message_id = m.message_id AND m.state = 'dead_lettered'
    """,
    "ALTER TABLE messages ALTER COLUMN publication SET NOT NULL",
    "ALTER TABLE messages ALTER COLUMN accept_seq SET NOT NULL",
    """
    ALTER TABLE messages ADD CONSTRAINT messages_publication_kind_check
        CHECK (publication_kind IN ('continuation', 'intake', 'replay'))
    """,
    """
    CREATE UNIQUE INDEX messages_identity_revision ON messages (identity_hash, revision)
        WHERE state <> 'aborted'
    """,
    """
    CREATE INDEX messages_contract_open ON messages (desk, contract_id, accept_seq)
        WHERE state IN ('dead_lettered', 'delivering', 'parked', 'pending', 'queued')
    """,
    "CREATE INDEX messages_publication ON messages (publication)",
    # -- batches and keys ----------------------------------------------------------------------
    """
    ALTER TABLE batches
        ADD COLUMN state text NOT NULL DEFAULT 'accepted',
        ADD COLUMN pending_until timestamptz,
        ADD COLUMN accepted_at timestamptz
    """,
    "UPDATE batches SET accepted_at = created_at",
    """
    ALTER TABLE batches ADD CONSTRAINT batches_state_check
        CHECK (state IN ('aborted', 'accepted', 'pending'))
    """,
    "CREATE INDEX batches_pending ON batches (pending_until) WHERE state = 'pending'",
    "ALTER TABLE idempotency_keys ADD COLUMN batch_id text",
    # -- dead letters --------------------------------------------------------------------------
    "ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_reason_check",
    """
    ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_reason_check CHECK (reason IN (
        'drift_rejected', 'invalid_message', 'invalid_signature', 'retries_exhausted',
        'token_unavailable', 'upstream_rejected'))
    """,
    "ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_status_check",
    """
    ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_status_check
        CHECK (status IN ('discarded', 'open', 'replayed', 'replaying', 'resolved'))
    """,
    "ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_source",
    """
    ALTER TABLE dead_letters
        ADD COLUMN raw_headers jsonb,
        ADD COLUMN dedupe_key text,
        ADD COLUMN published_at timestamptz,
        ADD COLUMN replay_id text,
        ADD COLUMN closed_at timestamptz,
        ADD COLUMN closed_by text,
        ADD COLUMN close_reason text
    """,
    """
    UPDATE dead_letters d
       SET dedupe_key = 'legacy:' || d.dead_letter_id,
           published_at = d.created_at,
           raw_headers = coalesce(
               (SELECT jsonb_agg(jsonb_build_array(h.key, encode(convert_to(h.value, 'UTF8'),
                                                                 'base64')))
                  FROM jsonb_each_text(d.kafka_headers) h),
               '[]'::jsonb)
    """,
    "ALTER TABLE dead_letters ALTER COLUMN raw_headers SET NOT NULL",
    "ALTER TABLE dead_letters ALTER COLUMN dedupe_key SET NOT NULL",
    "ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_dedupe_key UNIQUE (dedupe_key)",
    "CREATE INDEX dead_letters_message ON dead_letters (message_id)",
    """
    CREATE INDEX dead_letters_unpublished ON dead_letters (created_at)
        WHERE published_at IS NULL
    """,
    # -- holds ---------------------------------------------------------------------------------
    "ALTER TABLE holds ALTER COLUMN reconciled_position_mwh DROP NOT NULL",
    "ALTER TABLE holds ALTER COLUMN variance DROP NOT NULL",
    "ALTER TABLE holds ADD COLUMN reason text NOT NULL DEFAULT 'drift'",
    # -- replays (and continuations of parked records) ------------------------------------------
    "ALTER TABLE replays ADD COLUMN kind text NOT NULL DEFAULT 'replay'",
    """
    ALTER TABLE replays ADD CONSTRAINT replays_kind_check
        CHECK (kind IN ('continuation', 'replay'))
    """,
    "DROP INDEX replay_items_open_dead_letter",
    "ALTER TABLE replay_items ALTER COLUMN dead_letter_id DROP NOT NULL",
    # -- audit: appended without a lock, sequenced afterwards -------------------------------------
    "ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey",
    "ALTER TABLE audit_log ADD COLUMN id bigint GENERATED BY DEFAULT AS IDENTITY",
    "UPDATE audit_log SET id = seq",
    "SELECT setval(pg_get_serial_sequence('audit_log', 'id'), coalesce(max(id), 0) + 1, false)"
    " FROM audit_log",
    "ALTER TABLE audit_log ADD PRIMARY KEY (id)",
    "ALTER TABLE audit_log ALTER COLUMN seq DROP NOT NULL",
    "ALTER TABLE audit_log ALTER COLUMN prev_hash DROP NOT NULL",
    "ALTER TABLE audit_log ALTER COLUMN hash DROP NOT NULL",
    "ALTER TABLE audit_log ADD CONSTRAINT audit_log_seq_key UNIQUE (seq)",
    "DROP INDEX audit_log_message",
    "CREATE INDEX audit_log_message ON audit_log (message_id, id) WHERE message_id IS NOT NULL",
    "CREATE INDEX audit_log_batch ON audit_log (batch_id) WHERE batch_id IS NOT NULL",
    "CREATE INDEX audit_log_unsequenced ON audit_log (id) WHERE hash IS NULL",
    "DROP TRIGGER audit_log_no_update_delete ON audit_log",
    # Nothing but the sequencer's one write of the chain columns may change a row.
    """
    CREATE FUNCTION audit_log_sequence_once() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.hash IS NULL AND NEW.hash IS NOT NULL AND NEW.seq IS NOT NULL
           AND NEW.prev_hash IS NOT NULL
           AND (NEW.id, NEW.at, NEW.actor_kind, NEW.actor, NEW.desk, NEW.token_id,
                NEW.source_address, NEW.action, NEW.state, NEW.message_id, NEW.batch_id,
                NEW.subject_id, NEW.detail)
               IS NOT DISTINCT FROM
               (OLD.id, OLD.at, OLD.actor_kind, OLD.actor, OLD.desk, OLD.token_id,
                OLD.source_address, OLD.action, OLD.state, OLD.message_id, OLD.batch_id,
                OLD.subject_id, OLD.detail)
        THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END;
    $$
    """,
    """
    CREATE TRIGGER audit_log_sequence_once BEFORE UPDATE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_sequence_once()
    """,
    """
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError(
        "0002 changes how records are accepted and audited; restore a backup taken before "
        "the upgrade instead of downgrading"
    )
