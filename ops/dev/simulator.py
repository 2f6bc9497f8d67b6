"""`etrm-sync mock-etrm`: an ETRM engine simulator speaking the upstream side of CONTRACT §4.

It issues OAuth2 client-credentials tokens, checks the bearer token and the X-Signature, keeps
Idempotency-Key dedup (a duplicate POST answers 200 with the first transaction and is counted
apart from effects), and can be told to be slow, flaky, down, to reject some contracts, to fail
the first N attempts of every key, or to report a drifted reconciled position. `/_sim/*` lets
tests and the demo read what it received and change its behaviour while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fnmatch
import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass
class SimConfig:
    client_id: str = "etrm-sync"
    client_secret: str = "dev-client-secret"  # noqa: S105 - overridden by the caller
    signing_secret: str = ""
    token_ttl_s: int = 300
    latency_ms: float = 0.0
    error_rate: float = 0.0
    outage: bool = False
    outage_status: int = 503
    retry_after_s: int | None = None
    fail_first_attempts: int = 0
    reject_contracts: list[str] = field(default_factory=list)
    down_contracts: list[str] = field(default_factory=list)
    drift_contracts: list[str] = field(default_factory=list)
    drift_fraction: str = "0.02"
    token_outage: bool = False
    seed: int | None = None
    # Scripted answers, checked in order before anything else (see `Script`).
    scripts: list[Script] = field(default_factory=list)
    # A real ETRM engine may repeat the reconciled position when it answers a key it has.
    position_on_duplicates: bool = False


@dataclass
class Script:
    """Answer POSTs of matching records with this status and raw body — the odd answers a
    fault test needs: `effect=True` books the record first (a 201 whose body is garbage is
    still an effect). Matches by contract glob and, optionally, the submitted position."""

    contracts: str
    status: int
    body: bytes = b"{}"
    position: str | None = None
    effect: bool = False
    times: int | None = None  # None: every time
    headers: dict[str, str] = field(default_factory=dict)
    used: int = 0

    def applies(self, contract: str, position: str) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if self.position is not None and Decimal(self.position) != Decimal(position):
            return False
        return fnmatch.fnmatchcase(contract, self.contracts)


@dataclass
class Effect:
    order: int
    idempotency_key: str
    transaction_id: str
    contract_id: str
    revision: int
    position_mwh: str
    settlement_run_id: str
    received_at: float
    reconciled_mwh: str


class SimState:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.tokens: dict[str, float] = {}
        self.effects: list[Effect] = []
        self.by_key: dict[str, Effect] = {}
        self.attempts_by_key: dict[str, int] = {}
        # Every POST per Idempotency-Key, duplicates included: "took effect twice" is checked
        # against `effects`, "sent more than needed" against this.
        self.posts_by_key: collections.Counter[str] = collections.Counter()
        self.posts = 0
        self.arrivals: list[float] = []  # when each POST arrived (wall clock)
        self.duplicate_posts = 0
        self.rejected_posts = 0
        self.failed_posts = 0
        self.unauthorized_posts = 0
        self.tokens_issued = 0
        self.rng = random.Random(config.seed)

    def book(
        self, key: str, record: dict[str, Any], position: str, reconciled: str | None = None
    ) -> Effect:
        """The record takes effect in the engine's books: once per Idempotency-Key."""
        effect = Effect(
            order=len(self.effects),
            idempotency_key=key,
            transaction_id=f"TX-{uuid.uuid4().hex[:16].upper()}",
            contract_id=str(record.get("contract_id", "")),
            revision=int(record.get("revision", 1)),
            position_mwh=str(Decimal(position)),
            settlement_run_id=str(record.get("settlement_run_id", "")),
            received_at=time.time(),
            reconciled_mwh=reconciled or f"{Decimal(position).quantize(Decimal('0.001'))}",
        )
        self.effects.append(effect)
        self.by_key[key] = effect
        return effect

    async def answer_sync(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        """One `POST /api/v1/settlements/sync` (CONTRACT §4): status, answer, extra headers.
        `headers` by lower-case name."""
        cfg = self.config
        self.posts += 1
        self.arrivals.append(time.time())
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if self.tokens.get(bearer, 0) < time.time():
            self.unauthorized_posts += 1
            return 401, {"error": "invalid or expired token"}, {}
        if cfg.signing_secret and not _signature_ok(
            cfg.signing_secret, body, headers.get("x-signature", "")
        ):
            self.rejected_posts += 1
            return 400, {"error": "bad X-Signature"}, {}
        key = headers.get("idempotency-key")
        if not key:
            self.rejected_posts += 1
            return 400, {"error": "Idempotency-Key required"}, {}
        self.posts_by_key[key] += 1
        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000)
        try:
            record = json.loads(body, parse_float=Decimal)
            contract = str(record["contract_id"])
        except (ValueError, KeyError, TypeError):
            self.rejected_posts += 1
            return 400, {"error": "not a settlement record"}, {}
        known = self.by_key.get(key)
        if known is not None:
            self.duplicate_posts += 1
            answer: dict[str, Any] = {"transaction_id": known.transaction_id}
            if cfg.position_on_duplicates:
                answer["reconciled_position_mwh"] = known.reconciled_mwh
            return 200, answer, {}
        self.attempts_by_key[key] = attempt = self.attempts_by_key.get(key, 0) + 1
        submitted = str(record.get("position_mwh", "0"))
        for script in cfg.scripts:
            if script.applies(contract, submitted):
                script.used += 1
                if script.effect:
                    self.book(key, record, submitted)
                else:
                    self.failed_posts += 1
                return script.status, script.body, script.headers
        retry_headers = (
            {"Retry-After": str(cfg.retry_after_s)} if cfg.retry_after_s is not None else {}
        )
        if cfg.outage or _matches(contract, cfg.down_contracts):
            self.failed_posts += 1
            return cfg.outage_status, {"error": "maintenance window"}, retry_headers
        if attempt <= cfg.fail_first_attempts or (
            cfg.error_rate and self.rng.random() < cfg.error_rate
        ):
            self.failed_posts += 1
            return 503, {"error": "temporarily unavailable"}, retry_headers
        if _matches(contract, cfg.reject_contracts):
            self.rejected_posts += 1
            return 422, {"error": f"contract {contract} is not booked in the ETRM engine"}, {}
        position = Decimal(submitted)
        reconciled = position
        if _matches(contract, cfg.drift_contracts):
            reconciled = position * (1 + Decimal(cfg.drift_fraction))
        effect = self.book(key, record, submitted, f"{reconciled.quantize(Decimal('0.001'))}")
        return (
            201,
            {
                "transaction_id": effect.transaction_id,
                "reconciled_position_mwh": effect.reconciled_mwh,
            },
            {},
        )

    def reset(self) -> None:
        self.__init__(self.config)  # type: ignore[misc]

    def summary(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "effects": len(self.effects),
            "duplicate_posts": self.duplicate_posts,
            "rejected_posts": self.rejected_posts,
            "failed_posts": self.failed_posts,
            "unauthorized_posts": self.unauthorized_posts,
            "tokens_issued": self.tokens_issued,
            "first_effect_at": self.effects[0].received_at if self.effects else None,
            "last_effect_at": self.effects[-1].received_at if self.effects else None,
        }


def _matches(contract: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(contract, p) for p in patterns)


SYNC_PATH = "/api/v1/settlements/sync"


class SyncEndpoint:
    """`POST /api/v1/settlements/sync` answered on ASGI directly, ahead of FastAPI's routing,
    request objects and exception layers; everything else goes on to the app. The simulator
    shares the bench's two cores with the processes it measures, and those layers were about
    half of its CPU per POST."""

    def __init__(self, app: ASGIApp, state: SimState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SYNC_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _answer(send, 405, b'{"detail":"Method Not Allowed"}', {"Allow": "POST"})
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:  # names come lower-case; the first one counts
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, answer, extra = await self.state.answer_sync(headers, b"".join(chunks))
        await _answer(
            send, status, answer if isinstance(answer, bytes) else orjson.dumps(answer), extra
        )


async def _answer(send: Send, status: int, content: bytes, extra: Mapping[str, str]) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def create_simulator(config: SimConfig | None = None) -> FastAPI:
    state = SimState(config or SimConfig())
    app = FastAPI(title="ETRM simulator", docs_url=None, redoc_url=None)
    app.state.sim = state
    app.add_middleware(SyncEndpoint, state=state)

    @app.post("/oauth/token")
    async def token(request: Request) -> JSONResponse:
        cfg = state.config
        if cfg.token_outage:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
        auth = request.headers.get("authorization", "")
        expected = base64.b64encode(f"{cfg.client_id}:{cfg.client_secret}".encode()).decode()
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if not hmac.compare_digest(auth, f"Basic {expected}"):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        value = secrets.token_urlsafe(24)
        state.tokens[value] = time.time() + cfg.token_ttl_s
        state.tokens_issued += 1
        return JSONResponse(
            {"access_token": value, "token_type": "Bearer", "expires_in": cfg.token_ttl_s}
        )

    @app.get("/_sim/received")
    async def received() -> dict[str, Any]:
        return {**state.summary(), "log": [asdict(e) for e in state.effects]}

    @app.get("/_sim/stats")
    async def stats() -> dict[str, Any]:
        return state.summary()

    @app.post("/_sim/effects")
    async def effects_of(request: Request) -> dict[str, Any]:
        """When each of the given Idempotency-Keys took effect (absent: not yet)."""
        keys = await request.json()
        return {k: asdict(state.by_key[k]) for k in keys if k in state.by_key}

    @app.get("/_sim/config")
    async def get_config() -> dict[str, Any]:
        public = asdict(state.config)
        public.pop("client_secret")
        public.pop("signing_secret")
        public["scripts"] = [
            {"contracts": sc.contracts, "status": sc.status, "used": sc.used}
            for sc in state.config.scripts
        ]
        return public

    @app.patch("/_sim/config")
    async def patch_config(request: Request) -> dict[str, Any]:
        changes = await request.json()
        for name, value in changes.items():
            if name in ("client_secret", "signing_secret") or not hasattr(state.config, name):
                return JSONResponse(
                    {"error": f"unknown setting {name}"},  # type: ignore[return-value]
                    status_code=400,
                )
            setattr(state.config, name, value)
        return await get_config()

    @app.post("/_sim/reset")
    async def reset() -> dict[str, Any]:
        state.reset()
        return state.summary()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _signature_ok(secret: str, body: bytes, header: str) -> bool:
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    timestamp = fields.get("t", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields.get("v1", ""))
