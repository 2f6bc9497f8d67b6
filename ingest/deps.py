"""What a request handler is given: the intake's services, and the caller (a verified principal
allowed past the rate limit). Routes declare them with `Annotated` aliases."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ingest.auth import Principal, TokenVerifier, unauthorized
from ingest.limits import DeskRateLimiter, FailureAlarm
from ingest.problems import Problem
from ingest.publisher import SettlementPublisher
from ingest.tls import presented_thumbprint
from ingest.waiting import WaitingWatch
from ledger.acceptance import Begun
from ledger.acceptance import Request as Request_
from ledger.console import Hit, Overview
from ledger.crypto import PayloadCipher
from ledger.reads import Batch, Message, OpenWork
from ledger.reconciliation import DeadLetterFilter
from ledger.rows import Actor, UpstreamView
from operations.housekeeping import Housekeeping
from operations.service import ReplayRequested
from runtime.settings import IntakeSettings
from schemas.states import BatchState

log = structlog.get_logger("etrm.intake")


class IntakeLedger(Protocol):
    """What the intake needs of the ledger (ledger.acceptance.IntakeStore; a fake in tests)."""

    def payload_cipher(self) -> PayloadCipher | None: ...
    async def begin(self, req: Request_) -> Begun: ...
    async def complete(self, req: Request_, actor: Actor, new: int) -> bool: ...
    async def abort(self, req: Request_) -> bool: ...
    async def abort_stalled(self, batch_ids: Sequence[str]) -> None: ...
    async def state_of(self, batch_id: str) -> BatchState | None: ...
    async def get_batch(self, batch_id: str, desk: str | None) -> Batch | None: ...
    async def get_message(self, message_id: str, desk: str | None) -> Message | None: ...
    async def open_work(self) -> OpenWork: ...
    async def ping(self) -> None: ...
    async def upstream_view(self) -> UpstreamView: ...


class ConsoleReadsPort(Protocol):
    """What the console reads besides the API's reads (ledger.console.ConsoleReads)."""

    async def overview(self) -> Overview: ...
    async def search(self, term: str, *, limit: int = 100) -> list[Hit]: ...
    async def audit_rows(self, message_id: str, batch_id: str | None) -> list[dict[str, Any]]: ...
    async def replays(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...
    async def replay_items(self, replay_id: str, limit: int = 500) -> list[dict[str, Any]]: ...


class Broker(Protocol):
    async def ping(self) -> None: ...
    async def stop(self) -> None: ...


class OperationsPort(Protocol):
    """What the routes need of the operations service (operations.service.Operations)."""

    async def list_dead_letters(
        self, where: DeadLetterFilter, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...
    async def replay_status(self, replay_id: str) -> dict[str, Any] | None: ...
    async def list_holds(
        self, *, state: str | None, desk: str | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def preview_replay(
        self, *, message_ids: Sequence[str] | None, where: DeadLetterFilter | None
    ) -> dict[str, Any]: ...
    async def request_replay(
        self,
        actor: Actor,
        *,
        message_ids: Sequence[str] | None,
        where: DeadLetterFilter | None,
        reason: str,
    ) -> ReplayRequested: ...
    async def approve_replay(self, replay_id: str, actor: Actor, reason: str | None) -> None: ...
    async def run_replay(self, replay_id: str, actor: Actor) -> bool: ...
    async def resume_replays(self, actor: Actor) -> int: ...
    async def discard(self, dead_letter_id: str, actor: Actor, reason: str) -> dict[str, Any]: ...
    async def decide_hold(
        self, hold_id: str, decision: str, actor: Actor, reason: str
    ) -> dict[str, Any]: ...
    async def upstream_status(self) -> dict[str, Any]: ...
    async def add_maintenance(
        self, actor: Actor, starts_at: datetime, ends_at: datetime, reason: str
    ) -> dict[str, Any]: ...
    async def cancel_maintenance(self, window_id: str, actor: Actor) -> dict[str, Any]: ...


@dataclass(slots=True)
class IntakeServices:
    """Built by the composition root (ops.bootstrap), or by a test with fakes."""

    settings: IntakeSettings
    ledger: IntakeLedger
    kafka: Broker
    publisher: SettlementPublisher
    verifier: TokenVerifier
    operations: OperationsPort
    rate_limiter: DeskRateLimiter
    alarm: FailureAlarm
    waiting: WaitingWatch
    housekeeping: Housekeeping | None = None
    # Records per second per desk (ETRM_DESK_RECORD_RATE_LIMIT); None: not limited.
    record_limiter: DeskRateLimiter | None = None
    console: ConsoleReadsPort | None = None  # the operations console's reads (/console)
    close: Callable[[], Awaitable[None]] | None = None  # releases what the root built


async def services(request: Request) -> IntakeServices:  # async: no thread-pool hop
    svc: IntakeServices = request.app.state.services
    return svc


ServicesDep = Annotated[IntakeServices, Depends(services)]

# Declares the bearer scheme in OpenAPI (so /docs can send a token); verification is ours.
bearer = HTTPBearer(auto_error=False, description="A JWT from the desk's identity provider")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def principal(request: Request, svc: ServicesDep, _: BearerDep) -> Principal:
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


def require(who: Principal, scope: str) -> None:
    if scope not in who.scopes:
        raise Problem(
            403, "insufficient_scope", f"this route needs the {scope} scope", required_scope=scope
        )
