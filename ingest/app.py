"""The intake: authenticate, validate, normalize, publish to Kafka, answer 202 at once.

Rules kept here (CONTRACT §3):
- every /v1 route needs a verified bearer token with that route's scope;
- the Idempotency-Key is taken only after the request validated, and released again when the
  broker does not acknowledge, so a request that was not accepted can always be retried;
- 202 only after the broker acknowledged every record; the ledger then records the acceptance;
- a desk sees only its own batches and messages (another desk's are 404).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from ingest.auth import Principal, TokenVerifier, unauthorized
from ingest.body import read_json
from ingest.limits import BodyLimit, DeskRateLimiter, FailureAlarm
from ingest.problems import Problem, problem_response
from ingest.publisher import PublishFailed, SettlementPublisher
from ingest.tls import presented_thumbprint
from ledger import store
from ledger.audit import Actor
from ledger.store import AcceptedMessage
from ops.operations import Operations
from runtime.settings import Settings
from schemas.envelope import Envelope, FieldError, envelope_for, validate_record
from schemas.records import CanonicalRecord, SourceRecord, iso_z

MAX_BATCH = 5000
MAX_REPORTED_ERRORS = 200
_RUN_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

log = structlog.get_logger("etrm.intake")

ACCEPTED = Counter("etrm_intake_records_accepted_total", "Records accepted", ["desk", "lane"])
HOLDS_OPEN = Gauge("etrm_holds_open", "Drift holds awaiting review")
DEAD_LETTERS_OPEN = Gauge("etrm_dead_letters_open", "Dead letters not yet replayed")
PUBLISH_FAILURES = Counter("etrm_intake_publish_failures_total", "Requests the broker refused")
REQUEST_LATENCY = Histogram(
    "etrm_intake_request_seconds",
    "Intake request latency",
    ["route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass(slots=True)
class IntakeServices:
    settings: Settings
    engine: AsyncEngine
    publisher: SettlementPublisher
    verifier: TokenVerifier
    operations: Operations
    rate_limiter: DeskRateLimiter
    alarm: FailureAlarm


async def services(request: Request) -> IntakeServices:  # async: no thread-pool hop
    svc: IntakeServices = request.app.state.services
    return svc


ServicesDep = Annotated[IntakeServices, Depends(services)]


async def principal(request: Request, svc: ServicesDep) -> Principal:
    source = request.client.host if request.client else "unknown"
    try:
        who = await svc.verifier.verify(request.headers.get("authorization"))
    except Problem as exc:
        svc.alarm.failed(source, str(exc.extra.get("reason", exc.code)))
        raise
    if who.cert_thumbprint is not None:
        # RFC 8705: a certificate-bound token is only good on a connection presenting that
        # certificate; a stolen token alone is useless.
        presented = presented_thumbprint(request.scope)
        if presented is None or not hmac.compare_digest(presented, who.cert_thumbprint):
            svc.alarm.failed(source, "certificate binding mismatch")
            raise unauthorized("token is bound to another client certificate")
    request.state.principal = who
    svc.rate_limiter.check(who.desk, who.subject)
    trader_scope = request.headers.get("x-trader-scope")
    if trader_scope is not None and trader_scope != who.desk:
        raise Problem(403, "desk_mismatch", "X-Trader-Scope must name the token's desk")
    log.debug(
        "authenticated", desk=who.desk, subject=who.subject, token_id=who.token_id, source=source
    )
    return who


PrincipalDep = Annotated[Principal, Depends(principal)]


def actor_of(request: Request, who: Principal) -> Actor:
    kind = "operator" if who.is_operator else "trader"
    address = request.client.host if request.client else None
    return Actor(kind, who.subject, who.desk, who.token_id, address)


def require(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise Problem(
            403, "insufficient_scope", f"this route needs the {scope} scope", required_scope=scope
        )


def _run_id_header(request: Request) -> str:
    run_id = request.headers.get("x-settlement-run-id")
    if run_id is None:
        raise Problem(
            400,
            "missing_header",
            "X-Settlement-Run-ID header is required",
            header="X-Settlement-Run-ID",
        )
    if len(run_id) != 16 or not set(run_id) <= _RUN_ID_CHARS:
        raise Problem(
            400,
            "malformed_header",
            "X-Settlement-Run-ID must match ^[A-Z0-9]{16}$",
            header="X-Settlement-Run-ID",
        )
    return run_id


def _idempotency_header(request: Request, *, required: bool) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        if required:
            raise Problem(
                400,
                "missing_header",
                "Idempotency-Key header is required on batches",
                header="Idempotency-Key",
            )
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise Problem(
            400,
            "malformed_header",
            "Idempotency-Key must be 1..255 printable chars",
            header="Idempotency-Key",
        )
    return key


def _field_errors(errors: Sequence[FieldError], *, batch: bool) -> Problem:
    listed = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        path = ("records", error.index, *error.loc) if batch else error.loc
        listed.append(
            {
                "index": error.index,
                "field": error.pointer,
                "pointer": "/" + "/".join(str(p) for p in path),
                "message": error.message,
            }
        )
    first = listed[0]
    where = f"record {first['index']}, " if batch else ""
    return Problem(
        422,
        "schema_violation",
        f"{len(errors)} schema violation(s); first: {where}{first['field'] or 'body'}: "
        f"{first['message']}",
        errors=listed,
    )


def _validate(raw_records: Sequence[Any], *, batch: bool) -> list[CanonicalRecord]:
    records: list[CanonicalRecord] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(raw_records):
        result = validate_record(raw, index if batch else None)
        if isinstance(result, list):
            errors.extend(result)
        else:
            records.append(result)
    if errors:
        raise _field_errors(errors, batch=batch)
    return records


def _request_hash(route: str, run_id: str, envelopes: Sequence[Envelope]) -> str:
    digest = hashlib.sha256(f"{route}\0{run_id}\0".encode())
    for envelope in envelopes:
        digest.update(envelope.message_id.encode())
    return digest.hexdigest()


async def _accept(
    request: Request,
    svc: ServicesDep,
    who: Principal,
    *,
    route: str,
    raw_records: Sequence[Any],
    key: str | None,
    run_id: str,
) -> tuple[str, str, list[Envelope]]:
    batch = route == "batch"
    records = _validate(raw_records, batch=batch)
    for index, record in enumerate(records):
        if record.settlement_run_id != run_id:
            raise Problem(
                400,
                "run_id_mismatch",
                "X-Settlement-Run-ID does not match the record's settlement_run_id",
                index=index if batch else None,
            )
        if not who.may_touch_contract(record.contract_id):
            raise Problem(
                403,
                "contract_not_allowed",
                f"this token may not submit contract {record.contract_id}",
                index=index if batch else None,
            )
    envelopes = [envelope_for(who.desk, record) for record in records]
    _reject_internal_conflicts(envelopes, batch=batch)
    key = key or envelopes[0].message_id
    request_hash = _request_hash(route, run_id, envelopes)
    batch_id = store.new_id("batch")
    trace_id: str = request.state.trace_id

    existing = await store.take_idempotency_key(
        svc.engine, who.desk, key, request_hash, svc.settings.idempotency_lease_s
    )
    if existing is not None:
        raise _key_in_use(existing, request_hash)
    accepted = [
        AcceptedMessage(
            index=i,
            message_id=e.message_id,
            identity=e.identity,
            contract_id=e.contract_id,
            market=e.market,
            revision=e.revision,
            topic=svc.publisher.topic_for(e),
            position_mwh=e.position_mwh,
            value=e.value,
        )
        for i, e in enumerate(envelopes)
    ]
    try:
        conflicts = await store.revision_conflicts(svc.engine, accepted)
        if conflicts:
            message, other = conflicts[0]
            raise Problem(
                409,
                "revision_conflict",
                "a record with the same identity and revision but other content exists; "
                "send a higher revision",
                index=message.index if batch else None,
                conflicting_message_id=other,
            )
        unique = list({e.message_id: e for e in envelopes}.values())
        await svc.publisher.publish(
            unique, desk=who.desk, trader=who.subject, trace_id=trace_id, batch_id=batch_id
        )
    except PublishFailed:
        PUBLISH_FAILURES.inc()
        await store.release_idempotency_key(svc.engine, who.desk, key, request_hash)
        raise Problem(
            503,
            "broker_unavailable",
            "the broker did not acknowledge the records; nothing was accepted, "
            "retry with the same Idempotency-Key",
            headers={"Retry-After": "1"},
        ) from None
    except BaseException:
        await store.release_idempotency_key(svc.engine, who.desk, key, request_hash)
        raise
    resource_kind = "batch" if batch else "message"
    resource_id = batch_id if batch else envelopes[0].message_id
    status_url = f"/v1/batches/{batch_id}" if batch else f"/v1/settlements/{resource_id}"
    try:
        await store.record_acceptance(
            svc.engine,
            batch_id=batch_id,
            desk=who.desk,
            trader=who.subject,
            settlement_run_id=run_id,
            idempotency_key=key,
            request_hash=request_hash,
            trace_id=trace_id,
            resource_kind=resource_kind,
            resource_id=resource_id,
            status_url=status_url,
            messages=accepted,
            actor=actor_of(request, who),
            cipher=svc.operations.cipher,
        )
    except Exception:
        # The records are on Kafka and the workers will deliver them; the client was not told
        # so, and may retry with the same key once the lease ends (same message ids: no
        # second effect).
        log.exception("acceptance_not_recorded", trace_id=trace_id)
        raise Problem(
            503,
            "ledger_unavailable",
            "the records could not be recorded as accepted; retry with the same Idempotency-Key",
            headers={"Retry-After": "30"},
        ) from None
    for lane, count in collections.Counter(e.lane for e in envelopes).items():
        ACCEPTED.labels(who.desk, lane).inc(count)
    log.info(
        "accepted",
        desk=who.desk,
        trader=who.subject,
        route=route,
        records=len(envelopes),
        batch_id=batch_id,
        trace_id=trace_id,
    )
    return batch_id, status_url, envelopes


def _reject_internal_conflicts(envelopes: Sequence[Envelope], *, batch: bool) -> None:
    seen: dict[tuple[str, int], str] = {}
    for index, envelope in enumerate(envelopes):
        slot = (envelope.identity, envelope.revision)
        if seen.setdefault(slot, envelope.message_id) != envelope.message_id:
            raise Problem(
                409,
                "revision_conflict",
                "two records in this request share identity and revision with "
                "different content; send a higher revision",
                index=index if batch else None,
            )


def _key_in_use(existing: store.ExistingKey, request_hash: str) -> Problem:
    if existing.state == "in_flight":
        return Problem(
            409, "request_in_flight", "a request with this Idempotency-Key is still being processed"
        )
    if existing.request_hash != request_hash:
        return Problem(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different body"
        )
    extra: dict[str, Any] = {"status_url": existing.status_url}
    if existing.resource_kind == "batch":
        extra["batch_id"] = existing.resource_id
    else:
        extra["message_id"] = existing.resource_id
    return Problem(
        409,
        "duplicate_request",
        "this Idempotency-Key was already used with the same body",
        headers={"Location": existing.status_url or ""},
        **extra,
    )


def _record_examples() -> dict[str, Any]:
    from ops import samples

    run = "RUN2026112700001"
    return {
        "canonical_real_time": {
            "summary": "Canonical ISO real-time price (priority lane)",
            "value": samples.canonical(run, "RT-PJM-000001"),
        },
        "iso_day_ahead_award": {
            "summary": "ISO day-ahead award (PJM, hour ending 17)",
            "value": samples.iso_award(run, "PJM-DA-000001"),
        },
        "otc_confirmation": {
            "summary": "Bilateral OTC confirmation (sell 400 MWh)",
            "value": samples.otc_confirmation(run, "OTC-TRADE-00077"),
        },
        "physical_nomination": {
            "summary": "Gas nomination in MMBtu (NAESB gas day)",
            "value": samples.gas_nomination(run, "GAS-NOM-000001"),
        },
    }


def _openapi_body(batch: bool) -> dict[str, Any]:
    record_schema = TypeAdapter(SourceRecord).json_schema(ref_template="#/$defs/{model}")
    examples = _record_examples()
    if batch:
        schema: dict[str, Any] = {
            "type": "object",
            "required": ["records"],
            "additionalProperties": False,
            "properties": {
                "records": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH,
                    "items": record_schema,
                }
            },
        }
        examples = {
            "every_kind": {
                "summary": "One record of every kind",
                "value": {"records": [e["value"] for e in examples.values()]},
            }
        }
    else:
        schema = record_schema
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema, "examples": examples}},
        }
    }


RUN_ID_HEADER = {
    "name": "X-Settlement-Run-ID",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Z0-9]{16}$"},
}


def _idempotency_param(required: bool) -> dict[str, Any]:
    return {
        "name": "Idempotency-Key",
        "in": "header",
        "required": required,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }


def create_app(build: Any = None, body_limit: int | None = None) -> FastAPI:
    """`build()` -> IntakeServices; the default builds real adapters (runtime.bootstrap)."""
    if body_limit is None:
        from runtime.settings import get_settings

        body_limit = get_settings().max_body_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from runtime import bootstrap

        factory = build or bootstrap.intake_services
        svc: IntakeServices = await factory()
        app.state.services = svc
        app.state.replay_tasks = set()
        # Replays interrupted by a restart carry on where they stopped.
        resume = asyncio.create_task(
            svc.operations.resume_replays(Actor("system", "intake-restart"))
        )
        app.state.replay_tasks.add(resume)
        try:
            yield
        finally:
            for task in list(app.state.replay_tasks):
                task.cancel()
            await asyncio.gather(*app.state.replay_tasks, return_exceptions=True)
            await bootstrap.close_intake(svc)

    app = FastAPI(
        title="etrm-sync intake",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=body_limit)

    @app.middleware("http")
    async def trace(request: Request, call_next: Any) -> Response:
        request.state.trace_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            response: Response = await call_next(request)
        except Exception:
            log.exception("unhandled_error", trace_id=request.state.trace_id, path=request.url.path)
            response = problem_response(
                Problem(500, "internal_error", "unexpected error; quote the trace id"),
                request.state.trace_id,
            )
        response.headers["X-Trace-ID"] = request.state.trace_id
        route = request.scope.get("route")
        REQUEST_LATENCY.labels(getattr(route, "path", "other"), str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        who = getattr(request.state, "principal", None)
        if exc.status in (401, 403):
            log.warning(
                "access_denied",
                status=exc.status,
                code=exc.code,
                reason=exc.extra.get("reason"),
                desk=getattr(who, "desk", None),
                client=request.client.host if request.client else None,
                path=request.url.path,
            )
        return problem_response(exc, getattr(request.state, "trace_id", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"index": None, "field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors()
        ]
        return problem_response(
            Problem(422, "schema_violation", "request does not match the schema", errors=errors),
            getattr(request.state, "trace_id", None),
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            Problem(exc.status_code, "http_error", str(exc.detail)),
            getattr(request.state, "trace_id", None),
        )

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", trace_id=getattr(request.state, "trace_id", None))
        return problem_response(
            Problem(500, "internal_error", "unexpected error; quote the trace id"),
            getattr(request.state, "trace_id", None),
        )

    @app.post(
        "/v1/settlements/sync",
        status_code=202,
        openapi_extra={
            **_openapi_body(batch=False),
            "parameters": [RUN_ID_HEADER, _idempotency_param(False)],
        },
    )
    async def sync_settlement(request: Request, svc: ServicesDep, who: PrincipalDep) -> Any:
        require(who, "settlements:write")
        run_id = _run_id_header(request)
        key = _idempotency_header(request, required=False)
        body = await read_json(request, svc.settings.max_body_bytes)
        _, status_url, envelopes = await _accept(
            request, svc, who, route="sync", raw_records=[body], key=key, run_id=run_id
        )
        return JSONResponse(
            {
                "status": "accepted",
                "message_id": envelopes[0].message_id,
                "trace_id": request.state.trace_id,
                "status_url": status_url,
            },
            status_code=202,
            headers={"Location": status_url},
        )

    @app.post(
        "/v1/settlements/batches",
        status_code=202,
        openapi_extra={
            **_openapi_body(batch=True),
            "parameters": [RUN_ID_HEADER, _idempotency_param(True)],
        },
    )
    async def submit_batch(request: Request, svc: ServicesDep, who: PrincipalDep) -> Any:
        require(who, "settlements:write")
        run_id = _run_id_header(request)
        key = _idempotency_header(request, required=True)
        body = await read_json(request, svc.settings.max_body_bytes)
        if not isinstance(body, dict) or "records" not in body:
            raise Problem(
                422,
                "schema_violation",
                "body must be an object with `records`",
                errors=[{"index": None, "field": "records", "message": "field required"}],
            )
        extra = sorted(set(body) - {"records"})
        if extra:
            raise Problem(
                422,
                "schema_violation",
                f"unknown field(s): {', '.join(extra)}",
                errors=[
                    {"index": None, "field": f, "message": "extra fields not permitted"}
                    for f in extra
                ],
            )
        records = body["records"]
        if not isinstance(records, list) or not 1 <= len(records) <= MAX_BATCH:
            raise Problem(
                422,
                "schema_violation",
                f"records must be a list of 1..{MAX_BATCH} records",
                errors=[{"index": None, "field": "records", "message": f"1..{MAX_BATCH} records"}],
            )
        batch_id, status_url, envelopes = await _accept(
            request, svc, who, route="batch", raw_records=records, key=key, run_id=run_id
        )
        return JSONResponse(
            {
                "batch_id": batch_id,
                "accepted": len(envelopes),
                "messages": [
                    {"index": i, "message_id": e.message_id} for i, e in enumerate(envelopes)
                ],
                "status_url": status_url,
                "trace_id": request.state.trace_id,
            },
            status_code=202,
            headers={"Location": status_url},
        )

    @app.get("/v1/batches/{batch_id}")
    async def read_batch(batch_id: str, svc: ServicesDep, who: PrincipalDep) -> Any:
        require(who, "settlements:read")
        batch = await store.get_batch(svc.engine, batch_id) if len(batch_id) <= 64 else None
        if batch is None or not who.sees_desk(batch["desk"]):
            raise Problem(404, "not_found", "no such batch")
        messages = [
            {"index": m["index"], "message_id": m["message_id"], "state": m["state"]}
            for m in batch["messages"]
            if m["contract_id"] is None or who.may_touch_contract(m["contract_id"])
        ]
        counts: dict[str, int] = {}
        for m in messages:
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        return {
            "batch_id": batch["batch_id"],
            "desk": batch["desk"],
            "settlement_run_id": batch["settlement_run_id"],
            "created_at": iso_z(batch["created_at"]),
            "counts": counts,
            "messages": messages,
        }

    @app.get("/v1/settlements/{message_id}")
    async def read_message(message_id: str, svc: ServicesDep, who: PrincipalDep) -> Any:
        require(who, "settlements:read")
        message = await store.get_message(svc.engine, message_id) if len(message_id) <= 64 else None
        if (
            message is None
            or not who.sees_desk(message["desk"])
            or not who.may_touch_contract(message["contract_id"])
        ):
            raise Problem(404, "not_found", "no such message")
        return {
            "message_id": message["message_id"],
            "batch_id": message["batch_id"],
            "desk": message["desk"],
            "settlement_run_id": message["settlement_run_id"],
            "contract_id": message["contract_id"],
            "revision": message["revision"],
            "state": message["state"],
            "attempts": message["attempts"],
            "upstream_transaction_id": message["upstream_transaction_id"],
            "last_error": message["last_error"],
            "trace_id": message["trace_id"],
            "history": [
                {"state": h["state"], "at": iso_z(h["at"]), "detail": h["detail"]}
                for h in message["history"]
            ],
        }

    from ingest.ops_routes import build_router

    app.include_router(build_router())

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi(svc: ServicesDep) -> Any:
        from ops.docs import asyncapi_document

        return asyncapi_document(svc.settings)

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(svc: ServicesDep) -> Any:
        checks: dict[str, str] = {}
        try:
            await store.ping(svc.engine)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable: {type(exc).__name__}"
        try:
            await svc.publisher.ping()
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unavailable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(svc: ServicesDep) -> Response:
        try:
            open_holds, open_dead_letters = await store.open_work(svc.engine)
            HOLDS_OPEN.set(open_holds)
            DEAD_LETTERS_OPEN.set(open_dead_letters)
        except Exception:  # noqa: S110 - the other series are still worth serving
            pass
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
