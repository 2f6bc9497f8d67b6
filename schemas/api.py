"""What the HTTP API answers (CONTRACT §3), as typed models: the intake's routes declare them as
response models, so OpenAPI shows every 2xx body and the problem+json shape of every error.
Timestamps are UTC `YYYY-MM-DDTHH:MM:SS.ffffffZ`; positions and prices are exact decimal strings.
No I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.states import MessageState


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldProblem(_Body):
    index: int | None = Field(description="Position of the record in the batch (null: single)")
    field: str = Field(description="Dotted path of the field inside the record")
    pointer: str = Field(description="JSON pointer into the request body")
    message: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; `code` names the problem, `errors` lists schema violations."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str
    trace_id: str | None = None
    errors: list[FieldProblem] | None = None


class SettlementAccepted(_Body):
    status: Literal["accepted"] = "accepted"
    message_id: str
    trace_id: str
    status_url: str


class AcceptedMessage(_Body):
    index: int
    message_id: str


class BatchAccepted(_Body):
    batch_id: str
    accepted: int
    messages: list[AcceptedMessage]
    status_url: str
    trace_id: str


class Waiting(_Body):
    """Why delivery is paused for a record that is not final yet (#8)."""

    reason: Literal["circuit_open", "maintenance"]
    until: str | None = None


class BatchMessageState(_Body):
    index: int
    message_id: str
    state: MessageState


class BatchStatus(_Body):
    batch_id: str
    desk: str
    settlement_run_id: str
    created_at: str
    counts: dict[str, int]
    messages: list[BatchMessageState]
    waiting: Waiting | None = None


class HistoryEntry(_Body):
    state: str
    at: str
    detail: str | None


class MessageStatus(_Body):
    message_id: str
    batch_id: str | None
    desk: str
    settlement_run_id: str
    contract_id: str
    revision: int
    state: MessageState
    attempts: int
    upstream_transaction_id: str | None
    last_error: str | None
    trace_id: str
    parked_behind: str | None = Field(
        None, description="While parked: the dead letter of this contract it waits behind"
    )
    history: list[HistoryEntry]
    waiting: Waiting | None = None


class DeadLetterItem(_Body):
    dead_letter_id: str
    message_id: str | None
    desk: str | None
    settlement_run_id: str | None
    contract_id: str | None
    reason: str
    status: str
    error_status: int | None
    attempts: int
    last_error: str | None
    first_attempt_at: str | None
    last_attempt_at: str | None
    created_at: str
    source_topic: str
    source_partition: int
    source_offset: int
    parked: int = Field(0, description="Later records of this contract parked behind it")


class ReconciliationPage(_Body):
    items: list[DeadLetterItem]
    next_cursor: str | None


class ReplayCreated(_Body):
    replay_id: str
    state: str
    count: int
    needs_approval: bool


class ReplayPreviewItem(_Body):
    dead_letter_id: str
    message_id: str
    desk: str
    contract_id: str | None
    reason: str


class ReplayPreview(_Body):
    dry_run: Literal[True] = True
    count: int
    needs_approval: bool
    desks: list[str]
    items: list[ReplayPreviewItem]


class ReplayProgress(_Body):
    published: int
    pending: int


class ReplayStatus(_Body):
    replay_id: str
    kind: str
    state: str
    count: int
    needs_approval: bool
    reason: str
    requested_by: str
    approved_by: str | None
    desks: list[str]
    progress: ReplayProgress
    outcome: dict[str, int] = Field(description="States of the replayed records now")
    created_at: str
    approved_at: str | None
    completed_at: str | None


class ReplayApproved(_Body):
    replay_id: str
    state: str


class HoldItem(_Body):
    hold_id: str
    message_id: str
    desk: str
    contract_id: str
    submitted_position_mwh: str
    reconciled_position_mwh: str | None = Field(
        description="null when the upstream's answer did not say (the record must be reviewed)"
    )
    variance: str | None
    reason: str
    state: str
    created_at: str
    decided_at: str | None
    decided_by: str | None
    decision_reason: str | None


class HoldsPage(_Body):
    items: list[HoldItem]


class HoldDecision(_Body):
    hold_id: str
    message_id: str
    state: str
    dead_letter_id: str | None


class Discarded(_Body):
    dead_letter_id: str
    message_id: str | None
    status: Literal["discarded"] = "discarded"
    continued: int = Field(description="Parked records of the contract that now continue")


class Health(_Body):
    status: Literal["ok"] = "ok"


class Readiness(_Body):
    ready: bool
    checks: dict[str, str]


class MaintenanceWindowBody(_Body):
    """A maintenance window: no request is sent to the upstream inside it (#8)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    id: str
    from_: str = Field(alias="from")
    until: str
    reason: str
    created_by: str
    created_at: str
    cancelled_at: str | None = None
    cancelled_by: str | None = None


class UpstreamStatus(_Body):
    """The upstream's circuit breaker and its maintenance windows not yet over (#8)."""

    circuit: Literal["closed", "open", "half_open"]
    since: str
    next_probe_at: str | None = Field(description="When the next probe is due (not closed)")
    reason: str | None = Field(description="Why it opened: failures or announced (by the upstream)")
    failures: int = Field(description="Transient failures in a row while closed")
    probe_owner: str | None = Field(description="The worker sending the probe (half open)")
    maintenance: list[MaintenanceWindowBody]
    waiting: Waiting | None = Field(description="Why records are not being sent now, if so")
