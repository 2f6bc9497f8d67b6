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
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingest import metrics
from ingest.auth import Principal
from ingest.deps import IntakeLedger, IntakeServices
from ingest.preparing import Prepared
from ingest.problems import Problem
from ledger import acceptance as ledger
from ledger.db import database_unavailable
from ledger.rows import Actor
from runtime.kafka import PublishFailed
from schemas.envelope import Envelope
from schemas.states import BatchState

log = structlog.get_logger("etrm.intake")


@dataclass(frozen=True, slots=True)
class Accepted:
    batch_id: str
    status_url: str
    envelopes: Sequence[Envelope]


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def _key_in_use(existing: ledger.KeyHeld, request_hash: str) -> Problem:
    if existing.state == "in_flight":
        return Problem(
            409,
            "request_in_flight",
            "a request with this Idempotency-Key is still being processed",
            headers={"Retry-After": "1"},
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


def ledger_unavailable(
    detail: str = "the settlement ledger is unavailable; nothing was accepted, retry with the "
    "same Idempotency-Key",
) -> Problem:
    metrics.LEDGER_UNAVAILABLE.inc()
    return Problem(503, "ledger_unavailable", detail, headers={"Retry-After": "2"})


def broker_unavailable() -> Problem:
    metrics.PUBLISH_FAILURES.inc()
    return Problem(
        503,
        "broker_unavailable",
        "the broker did not acknowledge the records; nothing was accepted, "
        "retry with the same Idempotency-Key",
        headers={"Retry-After": "1"},
    )


async def accept(
    svc: IntakeServices,
    who: Principal,
    actor: Actor,
    *,
    route: str,
    prepared: Prepared,
    key: str | None,
    run_id: str,
    trace_id: str,
    batch_id: str | None = None,
) -> Accepted:
    """Record, publish and accept a request whose records are prepared (ingest.preparing);
    `batch_id` when they were prepared for publishing under it (`new_batch_id`)."""
    batch = route == "batch"
    envelopes, request_hash, records = prepared.envelopes, prepared.request_hash, prepared.records
    batch_id = batch_id or new_batch_id()
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
        columns=prepared.columns,
        pending_lease_s=svc.settings.pending_lease_s,
        key_lease_s=max(svc.settings.idempotency_lease_s, svc.settings.pending_lease_s),
    )
    pending = await _begin(svc, request)
    # every record new to the ledger (and none repeated): all go, with no per-record work here
    every_new = len(pending.to_publish) == len(envelopes)
    if every_new:
        to_publish = envelopes
    else:
        by_id = {e.message_id: e for e in envelopes}
        to_publish = [by_id[r.message_id] for r in pending.to_publish]
    try:
        if every_new and prepared.kafka is not None:
            # laid into record batches already, under this batch id (a worker process)
            await svc.publisher.publish_built(prepared.kafka, batch_id=batch_id)
        else:
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
    for lane, count in prepared.lanes.items():
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
                if isinstance(exc, TimeoutError):
                    _release_when_back(svc, request)
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


# A request's begin that timed out may still be carried out by the database once it answers
# again; it is aborted until this long after the database first answered.
RELEASE_SETTLE_S = 3.0


class _Stalled:
    """Requests answered 503 because the database stalled under their begin. That statement
    may still be carried out when the database wakes up, leaving the request pending and its
    Idempotency-Key in flight, so the desk's retry with that key would get 409 until the
    sweeper found it past its pending lease. They are aborted together (nothing of them was
    published) as soon as the database answers, and again for RELEASE_SETTLE_S, in case a
    stalled statement comes after: one statement a second for all of them, however many
    requests a long stall refused."""

    def __init__(self, ledger: IntakeLedger) -> None:
        self.ledger = weakref.ref(ledger)  # held by the services, not kept alive by this
        # batch id -> (when refused, when the database first answered for it)
        self.batches: dict[str, tuple[float, float | None]] = {}
        self.task: asyncio.Task[None] | None = None

    def add(self, batch_id: str) -> None:
        self.batches[batch_id] = (time.monotonic(), None)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        while self.batches and (store := self.ledger()) is not None:
            batch_ids = list(self.batches)
            try:
                await store.abort_stalled(batch_ids)
            except Exception as exc:
                if not database_unavailable(exc):
                    log.warning("release_failed", error=type(exc).__name__)
                    self.batches.clear()
                    return
            else:
                answered = time.monotonic()
                for batch_id in batch_ids:
                    refused, first = self.batches[batch_id]
                    self.batches[batch_id] = (refused, first or answered)
            now = time.monotonic()
            for batch_id, (refused, first) in list(self.batches.items()):
                settled = first is not None and now - first >= RELEASE_SETTLE_S
                if settled or now - refused >= OUTCOME_WAIT_S:  # past it, the sweeper's
                    del self.batches[batch_id]
            await asyncio.sleep(1.0)


# One per ledger (per intake process, or per test's services).
_STALLED: weakref.WeakKeyDictionary[IntakeLedger, _Stalled] = weakref.WeakKeyDictionary()


def _release_when_back(svc: IntakeServices, request: ledger.Request) -> None:
    stalled = _STALLED.get(svc.ledger)
    if stalled is None:
        stalled = _STALLED[svc.ledger] = _Stalled(svc.ledger)
    stalled.add(request.batch_id)


async def _abort(svc: IntakeServices, request: ledger.Request) -> None:
    """Best effort: if the database is away too, the pending request is aborted by whoever
    finds it past its lease; it can never be completed by anyone."""
    try:
        await svc.ledger.abort(request)
    except Exception as exc:
        log.warning("abort_deferred", batch_id=request.batch_id, error=type(exc).__name__)


# How long an acceptance whose outcome the database did not tell (it went away under the
# statement that accepts it) keeps asking before the request is answered 500.
OUTCOME_WAIT_S = 120.0


async def _complete(svc: IntakeServices, request: ledger.Request, actor: Actor, new: int) -> bool:
    """True when accepted, False when it is certain it never will be (then 503). If the database
    fails to say, find out — or make sure it is not accepted — before answering: a 503 must
    never be followed by deliveries. The statement that accepts may have committed just before
    the database went away, so no answer is given until the database tells which: after
    OUTCOME_WAIT_S without it, a 500 that says the outcome is unknown (the same request with the
    same Idempotency-Key learns it)."""
    try:
        return await svc.ledger.complete(request, actor, new)
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        log.warning("acceptance_outcome_unknown", batch_id=request.batch_id)
    deadline = time.monotonic() + OUTCOME_WAIT_S
    while time.monotonic() < deadline:
        try:
            if await svc.ledger.abort(request):
                return False
            return await svc.ledger.state_of(request.batch_id) == BatchState.ACCEPTED
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            await asyncio.sleep(0.5)
    log.error("acceptance_outcome_still_unknown", batch_id=request.batch_id)
    raise Problem(
        500,
        "acceptance_outcome_unknown",
        "the ledger did not say whether this request was accepted; send it again with the "
        "same Idempotency-Key to learn its outcome",
    )
