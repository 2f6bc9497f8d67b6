"""The desks' routes (CONTRACT §3): submit one record or a batch, read a batch or a record.

A desk sees only its own desk's batches and records (another desk's are 404, by the same query
as one that does not exist), and only the contracts its token allows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind
from pydantic import TypeAdapter

from ingest.acceptance import Accepted, accept, new_batch_id
from ingest.auth import Principal
from ingest.body import HEAVY_BODY_BYTES, parse_body, read_body, read_json
from ingest.deps import IntakeServices, PrincipalDep, ServicesDep, actor_of, require
from ingest.preparing import (
    MAX_BATCH,
    Prepared,
    batch_records,
    prepare_batch_body,
    prepare_request,
    settle_parts,
)
from ingest.problems import Problem, problem_responses
from ingest.publisher import Publication
from ledger.crypto import PayloadCipher
from runtime import tracing
from runtime.cpu import HEAVY_RECORDS, in_process, off_loop, spare_processes
from schemas import samples
from schemas.api import (
    BatchAccepted,
    BatchMessageState,
    BatchStatus,
    HistoryEntry,
    MessageStatus,
    SettlementAccepted,
)
from schemas.records import SourceRecord, iso_z

router = APIRouter(tags=["settlements"])

_RUN_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
MAX_ID = 64
# A big body is prepared in parts of at least this much (~250 records), one per idle worker
# process: each part parses the whole body, which is not worth it for a small one.
SPLIT_BODY_BYTES = 128 * 1024
# A desk counts as alone when no other desk made a request for this long.
OTHER_DESKS_WITHIN_S = 1.0


def run_id_header(request: Request) -> str:
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


def idempotency_header(request: Request, *, required: bool) -> str | None:
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


def _record_examples() -> dict[str, Any]:
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


RUN_ID_PARAM = {
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


SUBMIT_PROBLEMS = problem_responses(400, 401, 403, 409, 413, 415, 422, 429, 503)
READ_PROBLEMS = problem_responses(401, 403, 404, 429, 503)


@router.post(
    "/v1/settlements/sync",
    status_code=202,
    response_model=SettlementAccepted,
    responses=SUBMIT_PROBLEMS,
    openapi_extra={
        **_openapi_body(batch=False),
        "parameters": [RUN_ID_PARAM, _idempotency_param(False)],
    },
)
async def sync_settlement(request: Request, svc: ServicesDep, who: PrincipalDep) -> JSONResponse:
    require(who, "settlements:write")
    run_id = run_id_header(request)
    key = idempotency_header(request, required=False)
    body = await read_json(request, svc.settings.max_body_bytes)
    _limit_records(svc, who, 1)
    prepared = prepare_request(who, [body], route="sync", run_id=run_id, lanes=svc.publisher.lanes)
    accepted = await _accept(request, svc, who, "sync", prepared, key, run_id)
    answer = SettlementAccepted(
        message_id=accepted.envelopes[0].message_id,
        trace_id=request.state.trace_id,
        status_url=accepted.status_url,
    )
    return JSONResponse(
        answer.model_dump(), status_code=202, headers={"Location": accepted.status_url}
    )


@router.post(
    "/v1/settlements/batches",
    status_code=202,
    response_model=BatchAccepted,
    responses=SUBMIT_PROBLEMS,
    openapi_extra={
        **_openapi_body(batch=True),
        "parameters": [RUN_ID_PARAM, _idempotency_param(True)],
    },
)
async def submit_batch(request: Request, svc: ServicesDep, who: PrincipalDep) -> Response:
    require(who, "settlements:write")
    run_id = run_id_header(request)
    key = idempotency_header(request, required=True)
    batch_id = new_batch_id()
    prepared = await _prepare_batch(request, svc, who, run_id, batch_id)
    accepted = await _accept(request, svc, who, "batch", prepared, key, run_id, batch_id)
    # The BatchAccepted shape (response_model), written directly around the `messages` list
    # encoded where the batch was prepared (a worker process for a big one): 5,000 pydantic
    # objects and a json.dumps of them held the event loop for tens of milliseconds per big
    # batch, and building and encoding the list here still 8-13 ms.
    answer = b"".join(
        (
            b'{"batch_id":',
            orjson.dumps(accepted.batch_id),
            b',"accepted":',
            b"%d" % len(accepted.envelopes),
            b',"messages":',
            prepared.messages_json,
            b',"status_url":',
            orjson.dumps(accepted.status_url),
            b',"trace_id":',
            orjson.dumps(request.state.trace_id),
            b"}",
        )
    )
    return Response(
        answer,
        status_code=202,
        media_type="application/json",
        headers={"Location": accepted.status_url},
    )


def _limit_records(svc: IntakeServices, who: Principal, count: int) -> None:
    if svc.record_limiter is not None:
        svc.record_limiter.check(who.desk, who.subject, count)


async def _prepare_batch(
    request: Request, svc: IntakeServices, who: Principal, run_id: str, batch_id: str
) -> Prepared:
    """A big body is parsed and its records prepared — and signed, sealed and laid into Kafka
    record batches — in a worker process (runtime.cpu): one desk's 5,000-record batch does not
    hold the event loop, nor its GIL, while other desks wait. A small one is done here (off the
    loop above HEAVY_RECORDS records)."""
    lanes = svc.publisher.lanes
    raw = await read_body(request, svc.settings.max_body_bytes)
    if len(raw) > HEAVY_BODY_BYTES:  # without worker processes, in_process uses a thread
        publication = await svc.publisher.publication(
            desk=who.desk, trader=who.subject, trace_id=request.state.trace_id, batch_id=batch_id
        )
        # the idle worker processes all take part only while no other desk is being served
        shared = svc.rate_limiter.others_seen(who.desk, OTHER_DESKS_WITHIN_S)
        prepared = await _prepare_in_processes(
            raw, who, run_id, lanes, publication, svc.ledger.payload_cipher(), alone=not shared
        )
        _limit_records(svc, who, len(prepared.envelopes))
        return prepared
    records = batch_records(await parse_body(raw))
    _limit_records(svc, who, len(records))
    return await off_loop(
        len(records) > HEAVY_RECORDS,
        lambda: prepare_request(who, records, route="batch", run_id=run_id, lanes=lanes),
    )


async def _prepare_in_processes(
    raw: bytes,
    who: Principal,
    run_id: str,
    lanes: dict[str, str],
    publication: Publication | None,
    cipher: PayloadCipher | None,
    *,
    alone: bool,
) -> Prepared:
    """A big body in worker processes. When its desk is `alone` (no other desk's request
    lately), in as many parts as there are idle ones (at least SPLIT_BODY_BYTES of body each),
    so that a desk sending one batch at a time has it prepared on every core rather than one;
    busy ones (other requests' batches) are not waited for. With other desks about, in one:
    one desk's batch keeping every core busy, even niced, delays the others' requests. Any
    part refusing the batch for one of its own records refuses it in the whole batch's words
    (`settle_parts`); anything else that fails — records in two parts, a lost process — and
    the whole batch is prepared again in one piece, for the one answer it would have had."""
    work = (prepare_batch_body, raw, who, run_id, lanes, publication, cipher)
    parts = min(spare_processes(), len(raw) // SPLIT_BODY_BYTES) if alone else 1
    if parts > 1:
        done = await asyncio.gather(
            *(in_process(*work, (i, parts)) for i in range(parts)), return_exceptions=True
        )
        settled = settle_parts(done, run_id)
        if isinstance(settled, Problem):
            raise settled
        if settled is not None:
            return settled
    return await in_process(*work)


async def _accept(
    request: Request,
    svc: IntakeServices,
    who: Principal,
    route: str,
    prepared: Prepared,
    key: str | None,
    run_id: str,
    batch_id: str | None = None,
) -> Accepted:
    trace_id = request.state.trace_id
    with tracing.span(
        f"POST {request.url.path}",
        SpanKind.SERVER,
        tracing.desk_trace(trace_id),
        desk=who.desk,
        records=len(prepared.envelopes),
    ):
        return await accept(
            svc,
            who,
            actor_of(request, who),
            route=route,
            prepared=prepared,
            key=key,
            run_id=run_id,
            trace_id=trace_id,
            batch_id=batch_id,
        )


def _desk_filter(who: Principal) -> str | None:
    return None if who.is_operator else who.desk


@router.get("/v1/batches/{batch_id}", response_model=BatchStatus, responses=READ_PROBLEMS)
async def read_batch(batch_id: str, svc: ServicesDep, who: PrincipalDep) -> BatchStatus:
    require(who, "settlements:read")
    batch = (
        await svc.ledger.get_batch(batch_id, _desk_filter(who)) if len(batch_id) <= MAX_ID else None
    )
    if batch is None:
        raise Problem(404, "not_found", "no such batch")
    messages = [
        BatchMessageState(index=r.index, message_id=r.message_id, state=r.state)
        for r in batch.records
        if who.may_touch_contract(r.contract_id)
    ]
    counts: dict[str, int] = {}
    for m in messages:
        counts[m.state] = counts.get(m.state, 0) + 1
    return BatchStatus(
        batch_id=batch.batch_id,
        desk=batch.desk,
        settlement_run_id=batch.settlement_run_id,
        created_at=iso_z(batch.created_at),
        counts=counts,
        messages=messages,
        waiting=await svc.waiting.for_states([m.state for m in messages]),
    )


@router.get("/v1/settlements/{message_id}", response_model=MessageStatus, responses=READ_PROBLEMS)
async def read_message(message_id: str, svc: ServicesDep, who: PrincipalDep) -> MessageStatus:
    require(who, "settlements:read")
    message = (
        await svc.ledger.get_message(message_id, _desk_filter(who))
        if len(message_id) <= MAX_ID
        else None
    )
    if message is None or not who.may_touch_contract(message.contract_id):
        raise Problem(404, "not_found", "no such message")
    return MessageStatus(
        message_id=message.message_id,
        batch_id=message.batch_id,
        desk=message.desk,
        settlement_run_id=message.settlement_run_id,
        contract_id=message.contract_id,
        revision=message.revision,
        state=message.state,
        attempts=message.attempts,
        upstream_transaction_id=message.upstream_transaction_id,
        last_error=message.last_error,
        trace_id=message.trace_id,
        parked_behind=message.parked_behind_dead_letter,
        history=[
            HistoryEntry(state=h.state, at=iso_z(h.at), detail=h.detail) for h in message.history
        ],
        waiting=await svc.waiting.for_states([message.state]),
    )
