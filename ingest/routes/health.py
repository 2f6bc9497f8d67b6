"""Liveness, readiness (broker and database — never the upstream: the intake's job is to queue
while the upstream is away), Prometheus, and the AsyncAPI document of the topics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest import metrics
from ingest.deps import ServicesDep
from schemas.api import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health()


# A readiness probe answers within this, whatever state the broker or database is in: a stalled
# (frozen) server counts as unavailable instead of holding the probe open.
READY_CHECK_S = 2.0


async def _check(probe: Awaitable[None]) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_S):
            await probe
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    database, broker = await asyncio.gather(_check(svc.ledger.ping()), _check(svc.kafka.ping()))
    checks = {"database": database, "broker": broker}
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        Readiness(ready=ready, checks=checks).model_dump(), status_code=200 if ready else 503
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus(svc: ServicesDep, request: Request) -> Response:
    if not svc.settings.metrics_allowed(request.headers.get("authorization")):
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
    try:
        work = await svc.ledger.open_work()
        metrics.HOLDS_OPEN.set(work.holds)
        metrics.DEAD_LETTERS_OPEN.set(work.dead_letters)
        metrics.OLDEST_OPEN_AGE.set(work.oldest_undelivered_s)
    except Exception:  # noqa: S110 - the other series are still worth serving
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@cache
def asyncapi() -> dict[str, Any]:
    """docs/asyncapi.json, shipped inside the package as ingest/static/asyncapi.json."""
    packaged = resources.files("ingest") / "static" / "asyncapi.json"
    source = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"
    text = packaged.read_text() if packaged.is_file() else source.read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@router.get("/asyncapi.json", include_in_schema=False)
async def asyncapi_document() -> JSONResponse:
    return JSONResponse(asyncapi())
