"""The upstream's circuit breaker and maintenance windows (CONTRACT §3, issue #8): operators
read the breaker and declare or cancel windows; every change is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ingest.deps import PrincipalDep, ServicesDep, actor_of, require
from ingest.problems import Problem, problem_responses
from ingest.routes.operations import refused
from operations.service import OperationRefused
from schemas.api import MaintenanceWindowBody, UpstreamStatus

router = APIRouter(tags=["upstream"])
PROBLEMS = problem_responses(400, 401, 403, 404, 422, 429, 503)
MAX_WINDOW_ID = 64


class MaintenanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: datetime = Field(alias="from", description="Start, with a time zone (UTC `Z`)")
    until: datetime = Field(description="End, with a time zone; after `from`")
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


@router.get("/v1/upstream", response_model=UpstreamStatus, responses=PROBLEMS)
async def upstream_status(svc: ServicesDep, who: PrincipalDep) -> UpstreamStatus:
    require(who, "ops:read")
    return UpstreamStatus(**await svc.operations.upstream_status())


@router.post(
    "/v1/upstream/maintenance",
    status_code=201,
    response_model=MaintenanceWindowBody,
    responses=PROBLEMS,
)
async def add_maintenance(
    request: Request, body: MaintenanceRequest, svc: ServicesDep, who: PrincipalDep
) -> MaintenanceWindowBody:
    require(who, "ops:upstream")
    try:
        window = await svc.operations.add_maintenance(
            actor_of(request, who), body.from_, body.until, body.reason
        )
    except OperationRefused as exc:
        raise Problem(422, exc.code, exc.detail) from None
    return MaintenanceWindowBody(**window)


@router.delete(
    "/v1/upstream/maintenance/{window_id}",
    response_model=MaintenanceWindowBody,
    responses=PROBLEMS,
)
async def cancel_maintenance(
    request: Request, window_id: str, svc: ServicesDep, who: PrincipalDep
) -> MaintenanceWindowBody:
    require(who, "ops:upstream")
    if len(window_id) > MAX_WINDOW_ID:
        raise Problem(404, "not_found", "no such maintenance window")
    try:
        window = await svc.operations.cancel_maintenance(window_id, actor_of(request, who))
    except OperationRefused as exc:
        raise refused(exc) from None
    return MaintenanceWindowBody(**window)
