"""Accepting a desk's request, start to finish (CONTRACT §3; issue #6 I2).

Rules kept here:
- the request is validated whole before anything is recorded: a refused request takes no key
  and leaves no trace, so the desk can correct it and send it again;
- the ledger holds the request as pending before anything reaches the broker; the records are
  published (acks=all); only then is the request accepted and answered 202;
- when the broker does not acknowledge every record within the publish timeout, the request is
  aborted and answered 503: none of its records will ever reach the upstream (copies the broker
  took anyway are stale), and the same Idempotency-Key may be used again;
- a record another request already accepted is not published again; one another request is
  accepting right now is waited for (briefly).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingest import metrics
from ingest.auth import Principal
from ingest.deps import IntakeServices
from ingest.problems import Problem
from ledger import acceptance as ledger
from ledger.db import database_unavailable
from ledger.rows import Actor
from runtime.cpu import HEAVY_RECORDS, off_loop
from runtime.kafka import PublishFailed
from schemas.envelope import Envelope, FieldError, envelope_for, validate_record
from schemas.records import CanonicalRecord
from schemas.states import BatchState

MAX_BATCH = 5000
MAX_REPORTED_ERRORS = 200

log = structlog.get_logger("etrm.intake")


@dataclass(frozen=True, slots=True)
class Accepted:
    batch_id: str
    status_url: str
    envelopes: list[Envelope]


def field_errors(errors: Sequence[FieldError], *, batch: bool) -> Problem:
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


def validate(raw_records: Sequence[Any], *, batch: bool) -> list[CanonicalRecord]:
    records: list[CanonicalRecord] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(raw_records):
        result = validate_record(raw, index if batch else None)
        if isinstance(result, list):
            errors.extend(result)
        else:
            records.append(result)
    if errors:
        raise field_errors(errors, batch=batch)
    return records


def _request_hash(route: str, run_id: str, envelopes: Sequence[Envelope]) -> str:
    digest = hashlib.sha256(f"{route}\0{run_id}\0".encode())
    for envelope in envelopes:
        digest.update(envelope.message_id.encode())
    return digest.hexdigest()


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


def _key_in_use(existing: ledger.KeyHeld, request_hash: str) -> Problem:
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


def ledger_unavailable() -> Problem:
    metrics.LEDGER_UNAVAILABLE.inc()
    return Problem(
        503,
        "ledger_unavailable",
        "the settlement ledger is unavailable; nothing was accepted, retry with the same "
        "Idempotency-Key",
        headers={"Retry-After": "2"},
    )


def broker_unavailable() -> Problem:
    metrics.PUBLISH_FAILURES.inc()
    return Problem(
        503,
        "broker_unavailable",
        "the broker did not acknowledge the records; nothing was accepted, "
        "retry with the same Idempotency-Key",
        headers={"Retry-After": "1"},
    )


def _prepare(
    who: Principal, raw_records: Sequence[Any], *, route: str, run_id: str
) -> tuple[list[Envelope], str]:
    """The CPU part of an acceptance (run off the loop for big batches): validate every record,
    check it against the headers and the token, serialize and sign it, hash the request."""
    batch = route == "batch"
    records = validate(raw_records, batch=batch)
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
    return envelopes, _request_hash(route, run_id, envelopes)


async def accept(
    svc: IntakeServices,
    who: Principal,
    actor: Actor,
    *,
    route: str,
    raw_records: Sequence[Any],
    key: str | None,
    run_id: str,
    trace_id: str,
) -> Accepted:
    batch = route == "batch"
    if svc.record_limiter is not None:
        svc.record_limiter.check(who.desk, who.subject, len(raw_records))
    topic_for = svc.publisher.topic_for

    def prepare() -> tuple[list[Envelope], str, list[ledger.RecordToAccept]]:
        envelopes, request_hash = _prepare(who, raw_records, route=route, run_id=run_id)
        records = [
            ledger.RecordToAccept(
                index=i,
                message_id=e.message_id,
                identity=e.identity,
                contract_id=e.contract_id,
                market=e.market,
                revision=e.revision,
                topic=topic_for(e),
                position_mwh=e.position_mwh,
                value=e.value,
            )
            for i, e in enumerate(envelopes)
        ]
        return envelopes, request_hash, records

    envelopes, request_hash, records = await off_loop(len(raw_records) > HEAVY_RECORDS, prepare)
    batch_id = f"batch_{uuid.uuid4().hex}"
    status_url = (
        f"/v1/batches/{batch_id}" if batch else f"/v1/settlements/{envelopes[0].message_id}"
    )
    request = ledger.Request(
        batch_id=batch_id,
        desk=who.desk,
        trader=who.subject,
        settlement_run_id=run_id,
        idempotency_key=key or envelopes[0].message_id,
        request_hash=request_hash,
        trace_id=trace_id,
        resource_kind="batch" if batch else "message",
        resource_id=batch_id if batch else envelopes[0].message_id,
        status_url=status_url,
        records=records,
        pending_lease_s=svc.settings.pending_lease_s,
        key_lease_s=max(svc.settings.idempotency_lease_s, svc.settings.pending_lease_s),
    )
    pending = await _begin(svc, request)
    by_id = {e.message_id: e for e in envelopes}
    to_publish = [by_id[r.message_id] for r in pending.to_publish]
    try:
        await svc.publisher.publish(
            to_publish, desk=who.desk, trader=who.subject, trace_id=trace_id, batch_id=batch_id
        )
    except PublishFailed:
        await _abort(svc, request)
        raise broker_unavailable() from None
    except BaseException:
        await _abort(svc, request)
        raise
    if not await _complete(svc, request, actor, len(to_publish)):
        raise broker_unavailable()
    for lane, count in collections.Counter(e.lane for e in envelopes).items():
        metrics.ACCEPTED.labels(who.desk, lane).inc(count)
    log.info(
        "accepted",
        desk=who.desk,
        trader=who.subject,
        route=route,
        records=len(envelopes),
        published=len(to_publish),
        batch_id=batch_id,
        trace_id=trace_id,
    )
    return Accepted(batch_id, status_url, envelopes)


async def _begin(svc: IntakeServices, request: ledger.Request) -> ledger.Pending:
    deadline = time.monotonic() + svc.settings.pending_lease_s
    while True:
        try:
            begun = await svc.ledger.begin(request)
        except Exception as exc:
            if database_unavailable(exc):
                raise ledger_unavailable() from None
            raise
        match begun:
            case ledger.Pending():
                return begun
            case ledger.KeyHeld():
                raise _key_in_use(begun, request.request_hash)
            case ledger.RevisionConflict(index=index, conflicting_message_id=other):
                raise Problem(
                    409,
                    "revision_conflict",
                    "a record with the same identity and revision but other content exists "
                    "or is being accepted; send a higher revision",
                    index=index if request.resource_kind == "batch" else None,
                    conflicting_message_id=other,
                )
            case ledger.Busy(seconds=seconds):
                if time.monotonic() > deadline:
                    raise Problem(
                        503,
                        "records_in_flight",
                        "another request is accepting some of these records; retry",
                        headers={"Retry-After": "1"},
                    )
                await asyncio.sleep(max(0.01, seconds))


async def _abort(svc: IntakeServices, request: ledger.Request) -> None:
    """Best effort: if the database is away too, the pending request is aborted by whoever
    finds it past its lease; it can never be completed by anyone."""
    try:
        await svc.ledger.abort(request)
    except Exception as exc:
        log.warning("abort_deferred", batch_id=request.batch_id, error=type(exc).__name__)


async def _complete(svc: IntakeServices, request: ledger.Request, actor: Actor, new: int) -> bool:
    """True when accepted. If the database fails to say, find out — or make sure it is not
    accepted — before answering: a 503 must never be followed by deliveries."""
    try:
        return await svc.ledger.complete(request, actor, new)
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        log.warning("acceptance_outcome_unknown", batch_id=request.batch_id)
    deadline = time.monotonic() + svc.settings.pending_lease_s
    while time.monotonic() < deadline:
        try:
            if await svc.ledger.abort(request):
                return False
            return await svc.ledger.state_of(request.batch_id) == BatchState.ACCEPTED
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            await asyncio.sleep(0.5)
    return False
