"""What a request handler is given: the intake's services, and the caller (a verified principal
allowed past the rate limit). Routes declare them with `Annotated` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.auth import Principal, TokenVerifier, unauthorized
from ingest.limits import DeskRateLimiter, FailureAlarm
from ingest.problems import Problem
from ingest.publisher import SettlementPublisher
from ingest.tls import presented_thumbprint
from ledger.crypto import PayloadCipher
from ledger.rows import Actor
from operations.housekeeping import Housekeeping
from operations.service import Operations
from runtime.kafka import KafkaPublisher
from runtime.settings import IntakeSettings

log = structlog.get_logger("etrm.intake")


@dataclass(slots=True)
class IntakeServices:
    """Built by the composition root (ops.bootstrap), or by a test with fakes."""

    settings: IntakeSettings
    engine: AsyncEngine
    kafka: KafkaPublisher
    publisher: SettlementPublisher
    cipher: PayloadCipher
    verifier: TokenVerifier
    operations: Operations
    rate_limiter: DeskRateLimiter
    alarm: FailureAlarm
    housekeeping: Housekeeping | None = None


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
