"""Operations routes (CONTRACT §3): the reconciliation queue, replays, drift holds.

Operators' `ops:*` scopes see every desk; a desk token gets 403 here, never data.
"""

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ingest.auth import Principal
from ingest.problems import Problem
from ledger import reconciliation as recon
from ops.operations import OperationRefused, Operations, replay_id_valid
from schemas.records import iso_z

Text = Annotated[str, Field(min_length=1, max_length=1000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeadLetterQuery(_Body):
    desk: str | None = Field(None, max_length=64)
    settlement_run_id: str | None = Field(None, max_length=16)
    contract_id: str | None = Field(None, max_length=32)
    reason: str | None = Field(None, max_length=32)
    status: str | None = Field(None, max_length=16)
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


def num(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:f}"


DEAD_LETTER_FIELDS = (
    "dead_letter_id",
    "message_id",
    "desk",
    "settlement_run_id",
    "contract_id",
    "reason",
    "status",
    "error_status",
    "attempts",
    "last_error",
    "first_attempt_at",
    "last_attempt_at",
    "created_at",
    "source_topic",
    "source_partition",
    "source_offset",
)
HOLD_FIELDS = (
    "hold_id",
    "message_id",
    "desk",
    "contract_id",
    "submitted_position_mwh",
    "reconciled_position_mwh",
    "variance",
    "state",
    "created_at",
    "decided_at",
    "decided_by",
    "decision_reason",
)


def json_row(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A ledger row as the API shows it: UTC timestamps with Z, decimals as exact strings."""
    out: dict[str, Any] = {}
    for name in fields:
        value = row[name]
        if isinstance(value, datetime):
            value = iso_z(value)
        elif isinstance(value, Decimal):
            value = num(value)
        out[name] = value
    return out


def build_router() -> APIRouter:
    router = APIRouter()  # one per app: routes must not pile up when several apps are built
    from ingest.app import PrincipalDep, ServicesDep, actor_of, require

    def ops(svc: Any) -> Operations:
        operations: Operations = svc.operations
        return operations

    def refused(exc: OperationRefused) -> Problem:
        return Problem(exc.status, exc.code, exc.detail)

    def start_replay(request: Request, replay_id: str, who: Principal, svc: Any) -> None:
        tasks: set[asyncio.Task[bool]] = request.app.state.replay_tasks
        task = asyncio.create_task(ops(svc).run_replay(replay_id, actor_of(request, who)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @router.get("/v1/reconciliation")
    async def list_reconciliation(
        svc: ServicesDep,
        who: PrincipalDep,
        query: Annotated[ListQuery, Query()],
    ) -> Any:
        require(who, "ops:read")
        try:
            items, next_cursor = await recon.list_dead_letters(
                svc.engine, query.filter(), limit=query.limit, cursor=query.cursor
            )
        except ValueError:
            raise Problem(400, "malformed_cursor", "cursor is not one this API gave") from None
        return {
            "items": [json_row(i, DEAD_LETTER_FIELDS) for i in items],
            "next_cursor": next_cursor,
        }

    @router.post("/v1/reconciliation/replay")
    async def replay(
        request: Request, body: ReplayRequest, svc: ServicesDep, who: PrincipalDep
    ) -> Any:
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
                        "message": "exactly one of message_ids, filter",
                    }
                ],
            )
        try:
            result = await ops(svc).request_replay(
                actor_of(request, who),
                message_ids=body.message_ids,
                where=body.filter.filter() if body.filter else None,
                reason=body.reason,
                dry_run=body.dry_run,
            )
        except OperationRefused as exc:
            raise refused(exc) from None
        if body.dry_run:
            return JSONResponse(result, status_code=200)
        if result["state"] == "approved":
            start_replay(request, result["replay_id"], who, svc)
        return JSONResponse(
            {k: result[k] for k in ("replay_id", "state", "count", "needs_approval")},
            status_code=202,
            headers={"Location": f"/v1/reconciliation/replay/{result['replay_id']}"},
        )

    @router.post("/v1/reconciliation/replay/{replay_id}/approve")
    async def approve(
        request: Request,
        replay_id: str,
        svc: ServicesDep,
        who: PrincipalDep,
        body: Approval | None = None,
    ) -> Any:
        require(who, "ops:replay")
        if not replay_id_valid(replay_id):
            raise Problem(404, "not_found", "no such replay")
        try:
            await ops(svc).approve_replay(
                replay_id, actor_of(request, who), body.reason if body else None
            )
        except OperationRefused as exc:
            raise refused(exc) from None
        start_replay(request, replay_id, who, svc)
        return JSONResponse({"replay_id": replay_id, "state": "approved"}, status_code=202)

    @router.get("/v1/reconciliation/replay/{replay_id}")
    async def replay_status(replay_id: str, svc: ServicesDep, who: PrincipalDep) -> Any:
        require(who, "ops:read")
        replay = (
            await recon.get_replay(svc.engine, replay_id) if replay_id_valid(replay_id) else None
        )
        if replay is None:
            raise Problem(404, "not_found", "no such replay")
        return {
            "replay_id": replay["replay_id"],
            "state": replay["state"],
            "count": replay["item_count"],
            "needs_approval": replay["approved_by"] is not None
            or replay["state"] == "pending_approval",
            "reason": replay["reason"],
            "requested_by": replay["requested_by"],
            "approved_by": replay["approved_by"],
            "desks": replay["desks"],
            "progress": replay["progress"],
            "created_at": iso_z(replay["created_at"]),
            "approved_at": iso_z(replay["approved_at"]),
            "completed_at": iso_z(replay["completed_at"]),
        }

    @router.get("/v1/holds")
    async def holds(
        svc: ServicesDep,
        who: PrincipalDep,
        state: Annotated[str | None, Query(max_length=16)] = None,
        desk: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        require(who, "ops:read")
        rows = await recon.list_holds(svc.engine, state=state, desk=desk, limit=limit)
        return {"items": [json_row(h, HOLD_FIELDS) for h in rows]}

    async def decide(
        request: Request, hold_id: str, decision: str, body: Decision, svc: Any, who: Principal
    ) -> Any:
        require(who, "ops:holds")
        if len(hold_id) > 64:
            raise Problem(404, "not_found", "no such hold")
        try:
            return await ops(svc).decide_hold(
                hold_id, decision, actor_of(request, who), body.reason
            )
        except OperationRefused as exc:
            raise refused(exc) from None

    @router.post("/v1/holds/{hold_id}/release")
    async def release(
        request: Request, hold_id: str, body: Decision, svc: ServicesDep, who: PrincipalDep
    ) -> Any:
        return await decide(request, hold_id, "released", body, svc, who)

    @router.post("/v1/holds/{hold_id}/reject")
    async def reject(
        request: Request, hold_id: str, body: Decision, svc: ServicesDep, who: PrincipalDep
    ) -> Any:
        return await decide(request, hold_id, "rejected", body, svc, who)

    return router
