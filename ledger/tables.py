"""The ledger's tables as SQLAlchemy Core metadata: Alembic's `target_metadata`, and the one
place that says what the database holds (a test compares it with the migrated database).

Rules kept here (enforced by the database itself, whatever a caller does):
- one accepted record per settlement identity and revision (`messages_identity_revision`,
  aborted acceptances excluded, so a request answered 503 can be corrected and sent again);
- states, reasons and statuses are the words of `schemas.states`, nothing else;
- a dead letter is recorded once per cause (`dead_letters.dedupe_key`);
- audit rows are append-only; their chain columns are written once (migration triggers).
"""

from __future__ import annotations

from sqlalchemy import (
    TIMESTAMP,
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from schemas.states import (
    BatchState,
    CircuitState,
    DeadLetterReason,
    DeadLetterStatus,
    HoldState,
    MessageState,
    Publication,
    ReplayState,
    sql_values,
)

metadata = MetaData()


def _at(name: str, *, nullable: bool = True, now: bool = False) -> Column[object]:
    return Column(
        name,
        TIMESTAMP(timezone=True),
        nullable=nullable,
        server_default=func.now() if now else None,
    )


# The order in which records were accepted (202), across requests: later acceptances get
# higher numbers, so "earlier record of this contract" is a comparison of two numbers.
accept_seq = Sequence("message_accept_seq", metadata=metadata)

OPEN_FOR_ORDER = (
    MessageState.PENDING,
    MessageState.QUEUED,
    MessageState.DELIVERING,
    MessageState.PARKED,
    MessageState.DEAD_LETTERED,
)

messages = Table(
    "messages",
    metadata,
    Column("message_id", Text, primary_key=True),
    Column("desk", Text, nullable=False),
    Column("trader", Text, nullable=False),
    Column("batch_id", Text),
    Column("settlement_run_id", Text, nullable=False),
    Column("contract_id", Text, nullable=False),
    Column("market", Text, nullable=False),
    Column("identity_hash", Text, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("topic", Text, nullable=False),
    Column("state", Text, nullable=False),
    # Which Kafka copy is the live one (a batch id, a replay id); other copies are stale.
    Column("publication", Text, nullable=False),
    Column("publication_kind", Text, nullable=False, server_default=Publication.INTAKE.value),
    Column("accept_seq", BigInteger, nullable=False),
    Column("pending_until", TIMESTAMP(timezone=True)),
    # The delivery lease: who may send it, until when, and the fencing token of that claim.
    Column("lease_owner", Text),
    Column("lease_epoch", Integer, nullable=False, server_default=text("0")),
    Column("lease_until", TIMESTAMP(timezone=True)),
    # POSTs that may have been sent (written before each one) and retry time spent, across claims.
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("budget_used_s", Float, nullable=False, server_default=text("0")),
    Column("upstream_transaction_id", Text),
    Column("last_error", Text),
    Column("submitted_position_mwh", Numeric(12, 3), nullable=False),
    Column("reconciled_position_mwh", Numeric(16, 3)),
    Column("payload", LargeBinary, nullable=False),
    Column("payload_kid", Text, nullable=False),
    Column("trace_id", Text, nullable=False),
    Column("source_partition", Integer),
    Column("source_offset", BigInteger),
    # While dead_lettered: its dead letter. While parked: the record of its contract it waits
    # behind (the head, whose dead letter is open).
    Column("dead_letter_id", Text),
    Column("parked_behind", Text),
    _at("first_attempt_at"),
    _at("last_attempt_at"),
    _at("queued_at"),
    _at("final_at"),
    _at("created_at", nullable=False, now=True),
    _at("updated_at", nullable=False, now=True),
    CheckConstraint(f"state IN {sql_values(MessageState)}", name="messages_state_check"),
    CheckConstraint("revision >= 1", name="messages_revision_check"),
    CheckConstraint(
        f"publication_kind IN {sql_values(Publication)}", name="messages_publication_kind_check"
    ),
)
Index(
    "messages_identity_revision",
    messages.c.identity_hash,
    messages.c.revision,
    unique=True,
    postgresql_where=text("state <> 'aborted'"),
)
Index(
    "messages_contract_open",
    messages.c.desk,
    messages.c.contract_id,
    messages.c.accept_seq,
    postgresql_where=text(f"state IN {sql_values(frozenset(OPEN_FOR_ORDER))}"),
)
# Records being accepted, by request (migration 0007), as releases before accepting_sql wrote
# them (physically `pending`, turned `queued` by a second write of each record): the plan for
# completing or aborting their acceptance. Records accepted since never enter it.
Index(
    "messages_pending_publication",
    messages.c.publication,
    postgresql_where=text("state = 'pending'"),
)


def accepting_sql(m: str) -> str:
    """SQL true while record `m` (an alias of `messages`) is being accepted: the request that
    took it has not been answered 202 yet, so it is reported `pending` and never delivered.

    A record is written once, `queued`, under the intake request that takes it (its
    publication); the request's batch row alone says whether that request was accepted
    (`batches.state`): completing a request of 5,000 records is one row's write, not 5,000
    (every change of a record's state rewrites its row and its index entries). An accepted
    batch never goes back to pending, so a statement that sees it accepted may deliver its
    records; an aborted one takes its records to `aborted` in the same statement. Rows of
    releases before this one are `pending` themselves."""
    return (
        f"({m}.state = 'pending' OR EXISTS (SELECT 1 FROM batches accepting"
        f" WHERE {accepting_batch_sql(m, 'accepting')}))"
    )


def accepting_batch_sql(m: str, b: str) -> str:
    """SQL joining record `m` to `b` (an alias of `batches`), the request still accepting it
    (accepting_sql): for statements that also read that batch (its lease, its id)."""
    return (
        f"{b}.batch_id = {m}.publication AND {b}.state = 'pending'"
        f" AND {m}.publication_kind = 'intake' AND {m}.state IN ('pending', 'queued')"
    )


# Parked records, by the dead letter they wait behind (migration 0008): few at any time, read
# by the continuation job and the dead-letter list's counts without a scan of every record.
Index(
    "messages_parked",
    messages.c.parked_behind,
    messages.c.accept_seq,
    postgresql_where=text("state = 'parked'"),
)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", Text, primary_key=True),
    Column("desk", Text, nullable=False),
    Column("trader", Text, nullable=False),
    Column("settlement_run_id", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("record_count", Integer, nullable=False),
    Column("trace_id", Text, nullable=False),
    Column("state", Text, nullable=False, server_default=BatchState.ACCEPTED.value),
    _at("pending_until"),
    _at("accepted_at"),
    _at("created_at", nullable=False, now=True),
    CheckConstraint(f"state IN {sql_values(BatchState)}", name="batches_state_check"),
)
Index("batches_pending", batches.c.pending_until, postgresql_where=text("state = 'pending'"))

# A batch's records in order, one row each, written with (and only with) its batch row: no
# foreign key and no index by message id, a cost on every record that no statement needs
# (migration 0010).
batch_messages = Table(
    "batch_messages",
    metadata,
    Column("batch_id", Text, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("message_id", Text, nullable=False),
    PrimaryKeyConstraint("batch_id", "idx"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("desk", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("state", Text, nullable=False),
    _at("lease_until", nullable=False),
    Column("batch_id", Text),
    Column("resource_kind", Text),
    Column("resource_id", Text),
    Column("status_url", Text),
    _at("created_at", nullable=False, now=True),
    _at("completed_at"),
    PrimaryKeyConstraint("desk", "key"),
    CheckConstraint("state IN ('in_flight', 'completed')", name="idempotency_keys_state_check"),
)
Index("idempotency_keys_created", idempotency_keys.c.created_at)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("dead_letter_id", Text, primary_key=True),
    Column("message_id", Text),
    Column("desk", Text),
    Column("settlement_run_id", Text),
    Column("contract_id", Text),
    Column("reason", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=DeadLetterStatus.OPEN.value),
    Column("error_status", Integer),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    _at("first_attempt_at"),
    _at("last_attempt_at"),
    Column("source_topic", Text, nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("kafka_key", LargeBinary),
    Column("kafka_value", LargeBinary, nullable=False),
    Column("value_kid", Text, nullable=False),
    # Headers as people read them, and as they arrived ([name, base64 value | null] pairs).
    Column("kafka_headers", JSONB, nullable=False),
    Column("raw_headers", JSONB, nullable=False),
    # One dead letter per cause: a message's claim, a consumed record, a hold.
    Column("dedupe_key", Text, nullable=False),
    # Set once the record is on the reconciliation topic (outbox: database first).
    _at("published_at"),
    Column("replay_id", Text),
    _at("closed_at"),
    Column("closed_by", Text),
    Column("close_reason", Text),
    _at("created_at", nullable=False, now=True),
    CheckConstraint(f"reason IN {sql_values(DeadLetterReason)}", name="dead_letters_reason_check"),
    CheckConstraint(f"status IN {sql_values(DeadLetterStatus)}", name="dead_letters_status_check"),
    UniqueConstraint("dedupe_key", name="dead_letters_dedupe_key"),
)
Index("dead_letters_filter", dead_letters.c.desk, dead_letters.c.reason, dead_letters.c.created_at)
Index("dead_letters_message", dead_letters.c.message_id)
Index(
    "dead_letters_unpublished",
    dead_letters.c.created_at,
    postgresql_where=text("published_at IS NULL"),
)

holds = Table(
    "holds",
    metadata,
    Column("hold_id", Text, primary_key=True),
    Column("message_id", Text, ForeignKey("messages.message_id"), nullable=False, unique=True),
    Column("desk", Text, nullable=False),
    Column("contract_id", Text, nullable=False),
    Column("submitted_position_mwh", Numeric(12, 3), nullable=False),
    Column("reconciled_position_mwh", Numeric(16, 3)),
    Column("variance", Numeric(20, 6)),
    Column("reason", Text, nullable=False, server_default="drift"),
    Column("state", Text, nullable=False, server_default=HoldState.OPEN.value),
    _at("created_at", nullable=False, now=True),
    _at("decided_at"),
    Column("decided_by", Text),
    Column("decision_reason", Text),
    CheckConstraint(f"state IN {sql_values(HoldState)}", name="holds_state_check"),
)

replays = Table(
    "replays",
    metadata,
    Column("replay_id", Text, primary_key=True),
    Column("kind", Text, nullable=False, server_default=Publication.REPLAY.value),
    Column("state", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("requested_by", Text, nullable=False),
    Column("requested_desk", Text, nullable=False),
    Column("approved_by", Text),
    Column("approval_reason", Text),
    Column("item_count", Integer, nullable=False),
    Column("desks", ARRAY(Text), nullable=False),
    _at("lease_until"),
    _at("created_at", nullable=False, now=True),
    _at("approved_at"),
    _at("completed_at"),
    CheckConstraint(f"state IN {sql_values(ReplayState)}", name="replays_state_check"),
    CheckConstraint(
        f"kind IN {sql_values(frozenset({Publication.REPLAY, Publication.CONTINUATION}))}",
        name="replays_kind_check",
    ),
)

replay_items = Table(
    "replay_items",
    metadata,
    Column("replay_id", Text, ForeignKey("replays.replay_id"), nullable=False),
    Column("ord", Integer, nullable=False),
    Column("dead_letter_id", Text, ForeignKey("dead_letters.dead_letter_id")),
    Column("message_id", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    _at("published_at"),
    PrimaryKeyConstraint("replay_id", "ord"),
    CheckConstraint(
        "state IN ('pending', 'published', 'skipped')", name="replay_items_state_check"
    ),
)

# The audit trail. A row is appended by whoever acts, without waiting for anyone; the
# sequencer later gives it its place in the chain (seq, prev_hash, hash), written once.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("seq", BigInteger, unique=True),
    _at("at", nullable=False),
    Column("actor_kind", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("desk", Text),
    Column("token_id", Text),
    Column("source_address", Text),
    Column("action", Text, nullable=False),
    Column("state", Text),
    Column("message_id", Text),
    Column("batch_id", Text),
    Column("subject_id", Text),
    Column("detail", Text),
    Column("prev_hash", Text),
    Column("hash", Text),
)
Index(
    "audit_log_message",
    audit_log.c.message_id,
    audit_log.c.id,
    postgresql_where=text("message_id IS NOT NULL"),
)
Index("audit_log_batch", audit_log.c.batch_id, postgresql_where=text("batch_id IS NOT NULL"))
Index("audit_log_unsequenced", audit_log.c.id, postgresql_where=text("hash IS NULL"))

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("head_hash", Text, nullable=False),
    _at("at", nullable=False, now=True),
    Column("key_id", Text, nullable=False),
    Column("signature", Text, nullable=False),
)

# The upstream's circuit breaker (issue #8): one row per upstream, shared by every worker of
# the group, changed only under its row lock (ledger.upstream).
upstream_circuit = Table(
    "upstream_circuit",
    metadata,
    Column("upstream", Text, primary_key=True),
    Column("state", Text, nullable=False, server_default=CircuitState.CLOSED.value),
    _at("since", nullable=False, now=True),
    Column("reason", Text),
    Column("failures", Integer, nullable=False, server_default="0"),
    _at("window_started"),
    _at("next_probe_at"),
    Column("probe_owner", Text),
    _at("probe_until"),
    CheckConstraint(f"state IN {sql_values(CircuitState)}", name="upstream_circuit_state_check"),
)

# Maintenance windows operators declare ahead: no request is sent inside one.
maintenance_windows = Table(
    "maintenance_windows",
    metadata,
    Column("window_id", Text, primary_key=True),
    _at("starts_at", nullable=False),
    _at("ends_at", nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    _at("created_at", nullable=False, now=True),
    _at("cancelled_at"),
    Column("cancelled_by", Text),
    CheckConstraint("ends_at > starts_at", name="maintenance_windows_span_check"),
)
Index(
    "maintenance_windows_current",
    maintenance_windows.c.ends_at,
    postgresql_where=text("cancelled_at IS NULL"),
)

# Rolling upgrades: a migration that only adds (expand) declares the code revision it still
# serves, so processes of that older code keep running while the new code rolls out.
schema_compatibility = Table(
    "schema_compatibility",
    metadata,
    Column("revision", Text, primary_key=True),
    Column("serves_code_at", Text, nullable=False),
)
