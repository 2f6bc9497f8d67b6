"""Operations routes (CONTRACT §3): the reconciliation queue, replays, discards, drift holds.

Operators' `ops:*` scopes see every desk; a desk token gets 403 here, never data.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from ingest.deps import PrincipalDep, ServicesDep, actor_of, require
from ingest.problems import Problem, problem_responses
from ledger import reconciliation as recon
from ledger.rows import Actor
from operations.rules import replay_id_valid
from operations.service import OperationRefused
from schemas.api import (
    DeadLetterItem,
    Discarded,
    HoldDecision,
    HoldItem,
    HoldsPage,
    ReconciliationPage,
    ReplayApproved,
    ReplayCreated,
    ReplayPreview,
    ReplayStatus,
)
from schemas.records import iso_z
from schemas.states import DeadLetterReason, DeadLetterStatus, HoldState, status_filter

router = APIRouter(tags=["operations"])
Text = Annotated[str, Field(min_length=1, max_length=1000)]

REFUSALS = {
    "not_found": 404,
    "four_eyes": 403,
    "not_pending": 409,
    "already_decided": 409,
    "not_open": 409,
    "nothing_to_replay": 422,
}


def refused(exc: OperationRefused) -> Problem:
    return Problem(REFUSALS.get(exc.code, 409), exc.code, exc.detail)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The entry's status (`open`, `replayed`, …), or the upstream's HTTP status in it (`422`)
StatusFilter = Annotated[
    DeadLetterStatus | int,
    PlainValidator(status_filter),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": list(DeadLetterStatus)},
                {"type": "integer", "minimum": 100, "maximum": 599},
            ],
            "description": "the entry's status, or the HTTP status the upstream answered",
        }
    ),
]


class DeadLetterQuery(_Body):
    desk: str | None = Field(None, max_length=64)
    settlement_run_id: str | None = Field(None, max_length=16)
    contract_id: str | None = Field(None, max_length=32)
    reason: DeadLetterReason | None = None
    status: StatusFilter | None = None
    since: datetime | None = None
    until: datetime | None = None

    def filter(self) -> recon.DeadLetterFilter:
        return recon.DeadLetterFilter(**self.model_dump(include=set(recon.FILTER_KEYS)))


class ListQuery(DeadLetterQuery):
    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=512)


class ReplayRequest(_Body):
    message_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=100_000
    )
    filter: DeadLetterQuery | None = None
    reason: Text
    dry_run: bool = False


class Approval(_Body):
    reason: Text | None = None


class Decision(_Body):
    reason: Text


def _text(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, Decimal):
        return f"{value:f}"
    return value


def _row(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A ledger row as the API shows it: UTC timestamps with Z, decimals as exact strings."""
    return {name: _text(row[name]) for name in fields}


DEAD_LETTER_FIELDS = tuple(DeadLetterItem.model_fields)
HOLD_FIELDS = tuple(HoldItem.model_fields)
OPS_PROBLEMS = problem_responses(400, 401, 403, 404, 409, 422, 429, 503)


def start_run(request: Request, job_id: str, actor: Actor, svc: Any) -> None:
    """Publish a replay or continuation now, in the background (housekeeping would pick it up
    within seconds anyway, and resumes it if this process dies)."""
    tasks: set[asyncio.Task[bool]] = request.app.state.background
    task = asyncio.create_task(svc.operations.run_replay(job_id, actor))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


@router.get("/v1/reconciliation", response_model=ReconciliationPage, responses=OPS_PROBLEMS)
async def list_reconciliation(
    svc: ServicesDep, who: PrincipalDep, query: Annotated[ListQuery, Query()]
) -> ReconciliationPage:
    require(who, "ops:read")
    try:
        items, next_cursor = await svc.operations.list_dead_letters(
            query.filter(), limit=query.limit, cursor=query.cursor
        )
    except ValueError:
        raise Problem(400, "malformed_cursor", "cursor is not one this API gave") from None
    return ReconciliationPage(
        items=[DeadLetterItem(**_row(i, DEAD_LETTER_FIELDS)) for i in items],
        next_cursor=next_cursor,
    )


@router.post(
    "/v1/reconciliation/replay",
    status_code=202,
    response_model=ReplayCreated,
    responses={200: {"model": ReplayPreview, "description": "Dry run"}, **OPS_PROBLEMS},
)
async def replay(
    request: Request, body: ReplayRequest, svc: ServicesDep, who: PrincipalDep
) -> JSONResponse:
    require(who, "ops:replay")
    if (body.message_ids is None) == (body.filter is None):
        raise Problem(
            422,
            "schema_violation",
            "give either message_ids or filter",
            errors=[
                {
                    "index": None,
                    "field": "message_ids",
                    "pointer": "/message_ids",
                    "message": "exactly one of message_ids, filter",
                }
            ],
        )
    where = body.filter.filter() if body.filter else None
    if body.dry_run:
        preview = await svc.operations.preview_replay(message_ids=body.message_ids, where=where)
        return JSONResponse(ReplayPreview(**preview).model_dump(), status_code=200)
    actor = actor_of(request, who)
    try:
        created = await svc.operations.request_replay(
            actor, message_ids=body.message_ids, where=where, reason=body.reason
        )
    except OperationRefused as exc:
        raise refused(exc) from None
    if created.state == "approved":
        start_run(request, created.replay_id, actor, svc)
    answer = ReplayCreated(
        replay_id=created.replay_id,
        state=created.state,
        count=created.count,
        needs_approval=created.needs_approval,
    )
    return JSONResponse(
        answer.model_dump(),
        status_code=202,
        headers={"Location": f"/v1/reconciliation/replay/{created.replay_id}"},
    )


@router.post(
    "/v1/reconciliation/replay/{replay_id}/approve",
    status_code=202,
    response_model=ReplayApproved,
    responses=OPS_PROBLEMS,
)
async def approve(
    request: Request,
    replay_id: str,
    svc: ServicesDep,
    who: PrincipalDep,
    body: Approval | None = None,
) -> JSONResponse:
    require(who, "ops:replay")
    if not replay_id_valid(replay_id):
        raise Problem(404, "not_found", "no such replay")
    actor = actor_of(request, who)
    try:
        await svc.operations.approve_replay(replay_id, actor, body.reason if body else None)
    except OperationRefused as exc:
        raise refused(exc) from None
    start_run(request, replay_id, actor, svc)
    return JSONResponse(
        ReplayApproved(replay_id=replay_id, state="approved").model_dump(), status_code=202
    )


@router.get(
    "/v1/reconciliation/replay/{replay_id}", response_model=ReplayStatus, responses=OPS_PROBLEMS
)
async def replay_status(replay_id: str, svc: ServicesDep, who: PrincipalDep) -> ReplayStatus:
    require(who, "ops:read")
    job = await svc.operations.replay_status(replay_id) if replay_id_valid(replay_id) else None
    if job is None:
        raise Problem(404, "not_found", "no such replay")
    return ReplayStatus(
        replay_id=job["replay_id"],
        kind=job["kind"],
        state=job["state"],
        count=job["item_count"],
        needs_approval=job["approved_by"] is not None or job["state"] == "pending_approval",
        reason=job["reason"],
        requested_by=job["requested_by"],
        approved_by=job["approved_by"],
        desks=job["desks"],
        progress=job["progress"],
        outcome=job["outcome"],
        created_at=iso_z(job["created_at"]),
        approved_at=iso_z(job["approved_at"]),
        completed_at=iso_z(job["completed_at"]),
    )


@router.post(
    "/v1/reconciliation/{dead_letter_id}/discard",
    response_model=Discarded,
    responses=OPS_PROBLEMS,
)
async def discard(
    request: Request, dead_letter_id: str, body: Decision, svc: ServicesDep, who: PrincipalDep
) -> Discarded:
    require(who, "ops:replay")
    if len(dead_letter_id) > 64:
        raise Problem(404, "not_found", "no such dead letter")
    actor = actor_of(request, who)
    try:
        result = await svc.operations.discard(dead_letter_id, actor, body.reason)
    except OperationRefused as exc:
        raise refused(exc) from None
    if result["continuation_id"]:
        start_run(request, result["continuation_id"], actor, svc)
    return Discarded(
        dead_letter_id=result["dead_letter_id"],
        message_id=result["message_id"],
        continued=result["continued"],
    )


@router.get("/v1/holds", response_model=HoldsPage, responses=OPS_PROBLEMS)
async def holds(
    svc: ServicesDep,
    who: PrincipalDep,
    state: HoldState | None = None,
    desk: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> HoldsPage:
    require(who, "ops:read")
    rows = await svc.operations.list_holds(state=state, desk=desk, limit=limit)
    return HoldsPage(items=[HoldItem(**_row(h, HOLD_FIELDS)) for h in rows])


async def _decide(
    request: Request, hold_id: str, decision: str, body: Decision, svc: Any, who: Any
) -> HoldDecision:
    require(who, "ops:holds")
    if len(hold_id) > 64:
        raise Problem(404, "not_found", "no such hold")
    try:
        result = await svc.operations.decide_hold(
            hold_id, decision, actor_of(request, who), body.reason
        )
    except OperationRefused as exc:
        raise refused(exc) from None
    return HoldDecision(**result)


@router.post("/v1/holds/{hold_id}/release", response_model=HoldDecision, responses=OPS_PROBLEMS)
async def release(
    request: Request, hold_id: str, body: Decision, svc: ServicesDep, who: PrincipalDep
) -> HoldDecision:
    return await _decide(request, hold_id, "released", body, svc, who)


@router.post("/v1/holds/{hold_id}/reject", response_model=HoldDecision, responses=OPS_PROBLEMS)
async def reject(
    request: Request, hold_id: str, body: Decision, svc: ServicesDep, who: PrincipalDep
) -> HoldDecision:
    return await _decide(request, hold_id, "rejected", body, svc, who)
