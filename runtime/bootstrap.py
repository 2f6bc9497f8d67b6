"""The one place that builds real adapters from settings: database engine, Kafka producer,
JWKS verifier, upstream client. Everything else receives them ready-made."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn

from ingest.app import IntakeServices
from ingest.auth import JwksKeys, TokenVerifier
from ingest.limits import DeskRateLimiter, FailureAlarm
from ingest.publisher import SettlementPublisher
from ledger.db import ensure_schema_current, make_engine
from ops.operations import Operations
from runtime.kafka import all_topics, ensure_topics
from runtime.settings import Settings, get_settings
from workers.upstream import HttpPool, TokenProvider, UpstreamClient

INTAKE_REQUIRED = (
    "database_url",
    "jwks_url",
    "jwt_issuer",
    "jwt_audience",
    "message_signing_keys",
    "encryption_keys",
)
WORKER_REQUIRED = (
    "database_url",
    "upstream_url",
    "upstream_token_url",
    "upstream_client_id",
    "upstream_client_secret",
    "upstream_signing_secret",
    "message_signing_keys",
    "encryption_keys",
)


async def intake_services(settings: Settings | None = None) -> IntakeServices:
    settings = settings or get_settings()
    settings.require(*INTAKE_REQUIRED)
    assert settings.database_url
    assert settings.jwks_url
    assert settings.jwt_issuer
    assert settings.jwt_audience
    engine = make_engine(settings.database_url, settings.database_pool_size)
    await ensure_schema_current(engine)
    # The broker may come later; /readyz reports it meanwhile and the worker creates topics too.
    with contextlib.suppress(Exception):
        await ensure_topics(
            settings.kafka_bootstrap_servers, all_topics(settings), settings.kafka_partitions
        )
    publisher = SettlementPublisher(settings)
    await publisher.start()
    verifier = TokenVerifier(
        JwksKeys(settings.jwks_url, cooldown_s=settings.jwks_refresh_cooldown_s),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_s=settings.jwt_leeway_s,
    )
    default_rate, desk_rates = settings.desk_rates()
    return IntakeServices(
        settings,
        engine,
        publisher,
        verifier,
        Operations(engine, publisher, settings),
        DeskRateLimiter(default_rate, desk_rates),
        FailureAlarm(),
    )


async def close_intake(svc: IntakeServices) -> None:
    await svc.publisher.stop()
    await svc.engine.dispose()


def upstream_http(settings: Settings) -> HttpPool:
    return HttpPool(settings.worker_concurrency, settings.upstream_timeout_s)


def upstream_client(settings: Settings, http: HttpPool) -> UpstreamClient:
    settings.require(*WORKER_REQUIRED)
    assert settings.upstream_url
    assert settings.upstream_token_url
    assert settings.upstream_client_id
    tokens = TokenProvider(
        http,
        settings.upstream_token_url,
        settings.upstream_client_id,
        settings.secret("upstream_client_secret"),
    )
    return UpstreamClient(
        http,
        tokens,
        base_url=settings.upstream_url,
        signing_secret=settings.secret("upstream_signing_secret"),
        max_attempts=settings.upstream_max_attempts,
        budget_s=settings.upstream_retry_budget_s,
        backoff_base_s=settings.upstream_backoff_base_s,
        backoff_cap_s=settings.upstream_backoff_cap_s,
    )


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside a process that handles its own signals (the worker's health
    port, test servers): it must not take SIGINT/SIGTERM away from its host."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def ops_services(settings: Settings) -> Operations:
    """Database and broker for the operator commands (replay publishes, hold rejection)."""
    settings.require("database_url", "message_signing_keys", "encryption_keys")
    assert settings.database_url is not None
    engine = make_engine(settings.database_url, 4)
    await ensure_schema_current(engine)
    publisher = SettlementPublisher(settings)
    return Operations(engine, publisher, settings)


async def close_ops(ops: Operations) -> None:
    await ops.publisher.stop()
    await ops.engine.dispose()
