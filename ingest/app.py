"""The intake app factory: routers, problem handling, the trace id, and the lifespan that
starts and stops what the composition root built (ops.bootstrap).

Rules kept here (CONTRACT §3):
- every error is RFC 9457 problem+json; a database that is away is a 503 with Retry-After,
  never a 500; an unexpected error is a 500 with a trace id only, never a stack trace;
- every response carries `X-Trace-ID`; the same id travels on the Kafka message and upstream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest import metrics
from ingest.acceptance import ledger_unavailable
from ingest.console import routes as console
from ingest.deps import IntakeServices
from ingest.limits import BodyLimit
from ingest.problems import Problem, problem_response
from ingest.routes import health, operations, settlements, upstream
from ledger.db import database_unavailable
from ledger.rows import Actor
from runtime.aio import stop_tasks
from runtime.cpu import settle_heap
from schemas.api import ProblemDetails

log = structlog.get_logger("etrm.intake")
access_log = structlog.get_logger("etrm.access")

ServicesFactory = Callable[[], Awaitable[IntakeServices]]


class TraceAndTiming:
    """A trace id for every request (`request.state.trace_id`, `X-Trace-ID`) and its latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace_id = uuid.uuid4().hex
        scope.setdefault("state", {})["trace_id"] = trace_id
        started = time.perf_counter()
        status = 0

        async def send_with_trace(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-trace-id", trace_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        except Exception as exc:
            # Answered here, not by the server: no traceback (with SQL text in it) reaches
            # the log, and a database that is away is a 503, never a 500.
            status = await _unexpected(exc, trace_id, scope, send_with_trace, status)
        finally:
            route = scope.get("route")
            elapsed = time.perf_counter() - started
            metrics.REQUEST_LATENCY.labels(getattr(route, "path", "other"), str(status)).observe(
                elapsed
            )
            principal = scope["state"].get("principal")
            access_log.info(
                "request",
                method=scope.get("method"),
                path=scope.get("path", "")[:200],
                status=status,
                ms=round(elapsed * 1000, 2),
                trace_id=trace_id,
                desk=getattr(principal, "desk", None),
                client=(scope.get("client") or ("", 0))[0],
            )


async def _unexpected(exc: Exception, trace_id: str, scope: Scope, send: Send, sent: int) -> int:
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = (
        f"{frame.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno}"
        if frame
        else "?"
    )
    if database_unavailable(exc):
        log.warning("ledger_unavailable", trace_id=trace_id, error=type(exc).__name__)
        # An operator's change cut off by a stalled database was never committed, and a
        # read changes nothing; a request carrying records keeps the intake's own words.
        problem = (
            ledger_unavailable()
            if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/settlements")
            else ledger_unavailable(
                "the settlement ledger is unavailable; nothing was changed, try again shortly"
            )
        )
    else:
        log.error("unhandled_error", trace_id=trace_id, error=type(exc).__name__, at=where)
        problem = Problem(500, "internal_error", "unexpected error; quote the trace id")
    if sent:  # the response had started: all we can do is end the connection
        return sent
    response = problem_response(problem, trace_id)
    await response(scope, _no_receive, send)
    return problem.status


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _trace_id(request: Request) -> str | None:
    return getattr(request.state, "trace_id", None)


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with every error answered as problem+json (never FastAPI's HTTPValidationError)
    and a bearer scheme /docs can use."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.setdefault(
        "ProblemDetails",
        ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}"),
    )
    components.update(
        ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}").pop(
            "$defs", {}
        )
    )
    problem = {"$ref": "#/components/schemas/ProblemDetails"}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {"application/problem+json": {"schema": problem}}
    app.openapi_schema = document
    return document


def create_app(build: ServicesFactory, *, body_limit: int, body_timeout_s: float = 30.0) -> FastAPI:
    """`build()` gives the services (ops.bootstrap builds real adapters; tests may give fakes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = await build()
        settle_heap()
        app.state.services = svc
        app.state.background = set()
        if svc.housekeeping is not None:
            svc.housekeeping.start()
        # Replays interrupted by a restart carry on where they stopped.
        resume = asyncio.create_task(
            svc.operations.resume_replays(Actor("system", "intake-restart"))
        )
        app.state.background.add(resume)
        try:
            yield
        finally:
            await stop_tasks(app.state.background)
            if svc.housekeeping is not None:
                await svc.housekeeping.stop()
            if svc.close is not None:
                await svc.close()

    app = FastAPI(
        title="etrm-sync intake",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=body_limit, timeout_s=body_timeout_s)
    app.add_middleware(TraceAndTiming)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        who = getattr(request.state, "principal", None)
        if exc.status in (401, 403):
            metrics.AUTH_FAILURES.labels(str(exc.status), exc.code).inc()
            log.warning(
                "access_denied",
                status=exc.status,
                code=exc.code,
                reason=exc.extra.get("reason"),
                desk=getattr(who, "desk", None),
                client=request.client.host if request.client else None,
                path=request.url.path[:200],
            )
        return problem_response(exc, _trace_id(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "index": None,
                "field": ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]),
                "pointer": "/" + "/".join(str(p) for p in e["loc"][1:]),
                "message": e["msg"],
            }
            for e in exc.errors()
        ]
        return problem_response(
            Problem(422, "schema_violation", "request does not match the schema", errors=errors),
            _trace_id(request),
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            Problem(exc.status_code, "http_error", str(exc.detail)), _trace_id(request)
        )

    app.include_router(settlements.router)
    app.include_router(operations.router)
    app.include_router(upstream.router)
    app.include_router(health.router)
    console.install(app)
    return app
