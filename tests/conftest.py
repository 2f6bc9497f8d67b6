"""Test harness: real Tansu and real PostgreSQL for the session, started the same way as
`etrm-sync dev` does (ops.stack); per test a fresh pipeline — its own topics, consumer group,
ETRM simulator, intake and worker — so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import settings
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from ingest.deps import IntakeServices
from ledger.db import migrate
from ops.bootstrap import intake_app, run_worker
from ops.dev.devkeys import generate_signing_key, mint_token
from ops.dev.simulator import SimConfig, SimState, create_simulator
from ops.dev.stack import Broker, Database, free_port, isolated_settings
from runtime.kafka import ensure_topics
from runtime.servers import EmbeddedServer
from runtime.settings import StackSettings, settings_env
from tests.jwt_attacks import AUDIENCE, ISSUER
from tests.support import OPS

FINAL = {"delivered", "held", "dead_lettered", "superseded", "released", "rejected", "parked"}


TEMPLATE_DB = "etrm_test_template"

# Property-based tests explore the same examples on every run: a failure found once is found
# again, and a green run stays green (HYPOTHESIS_PROFILE=explore searches afresh, by hand).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-minutes",
        type=float,
        default=3.0,
        help="How long the fault-injection run injects faults (CI: 3; by hand: 20 or more)",
    )
    parser.addoption(
        "--chaos-seed", type=int, default=20261202, help="Seed of the workload and the faults"
    )


@dataclass
class Infra:
    broker: Broker
    server_url: str  # the server's maintenance database
    keys_dir: Path
    private_key: Path
    jwks: Path
    # The server process, when the test session started it (fault tests restart it).
    database: Database | None = None
    # The database of the current test (each pipeline gets a fresh one, see `fresh_database`).
    database_url: str = ""
    encryption_key: str = field(
        default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )


def _database_url(server_url: str, name: str) -> str:
    return str(make_url(server_url).set(database=name).render_as_string(hide_password=False))


async def _admin(server_url: str, *statements: str) -> None:
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def fresh_database(infra: Infra) -> str:
    """A database of its own for one test, cloned from the migrated template: background
    loops (outbox, sweepers, republisher) of one test never see another test's rows."""
    name = f"etrm_t_{uuid.uuid4().hex[:12]}"
    await _admin(infra.server_url, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    return _database_url(infra.server_url, name)


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    root = Path(tempfile.mkdtemp(prefix="etrm-test-"))
    broker = Broker(free_port(), root / "tansu.log").start()
    database = None
    url = os.environ.get("ETRM_TEST_DATABASE_URL")
    if not url:
        database = Database(root / "pg", free_port()).start()
        url = database.url
    asyncio.run(
        _admin(url, f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"', f'CREATE DATABASE "{TEMPLATE_DB}"')
    )
    asyncio.run(migrate(_database_url(url, TEMPLATE_DB)))
    private_key, jwks = generate_signing_key(root / "keys")
    try:
        yield Infra(broker, url, root / "keys", private_key, jwks, database)
    finally:
        broker.stop()
        if database:
            database.stop()
        shutil.rmtree(root, ignore_errors=True)


def make_settings(infra: Infra, **overrides: Any) -> StackSettings:
    values: dict[str, Any] = {
        "kafka_publish_timeout_s": 3.0,
        "database_pool_size": 5,
        "worker_concurrency": 16,
        "upstream_client_id": "etrm-sync-test",
        "upstream_client_secret": secrets.token_urlsafe(16),
        "upstream_signing_secret": secrets.token_urlsafe(16),
        "upstream_timeout_s": 2.0,
        "upstream_max_attempts": 4,
        "upstream_retry_budget_s": 10.0,
        "upstream_url": "http://127.0.0.1:9",  # replaced by the simulator's address
        "upstream_token_url": "http://127.0.0.1:9/oauth/token",
        "delivery_lease_s": 10.0,
        "upstream_backoff_base_s": 0.05,
        "upstream_backoff_cap_s": 0.2,
        "jwks_url": str(infra.jwks),
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "encryption_keys": f"e1={infra.encryption_key}",
    }
    values.update(overrides)
    database_url = values.pop("database_url", infra.database_url)
    return isolated_settings(infra.broker.bootstrap, database_url, "t", **values)


class Server:
    """A uvicorn server in this event loop, on a free loopback port."""

    def __init__(self, app: Any, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self.tls = "ssl_certfile" in config
        self.server = EmbeddedServer(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                # h11, as the intake and the workers serve in production; uvicorn's "auto" would
                # take httptools, which the dev tools install for the simulator only
                **{"http": "h11", **config},
            )
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> Server:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task:
            await self.task


@dataclass
class Pipeline:
    infra: Infra
    settings: StackSettings
    sim: SimState
    sim_server: Server
    intake: Server
    worker_stop: asyncio.Event | None = None
    worker_task: asyncio.Task[None] | None = None
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def intake_services(self) -> IntakeServices:
        """The running intake's own service objects (for tests that inject a fault into one)."""
        app: Any = self.intake.server.config.app
        services: IntakeServices = app.state.services
        return services

    @property
    def env(self) -> dict[str, str]:
        """The settings as ETRM_ variables, for a worker run as a separate process."""
        return settings_env(self.settings)

    def token(
        self,
        desk: str = "power-east",
        scopes: str = "settlements:write settlements:read",
        **kwargs: Any,
    ) -> str:
        return mint_token(
            self.infra.private_key,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=kwargs.pop("subject", "trader-1"),
            desk=desk,
            scopes=scopes.split(),
            **kwargs,
        )

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token or self.token(**kwargs)}"}
        client = httpx.AsyncClient(base_url=self.intake.url, headers=headers, timeout=30.0)
        self.clients.append(client)
        return client

    def operator(self, subject: str = "op-alice") -> httpx.AsyncClient:
        """A client with an operator's token (every ops scope)."""
        return self.client(desk="ops", scopes=OPS, subject=subject)

    def spawn_worker(self) -> subprocess.Popen[bytes]:
        """A worker in a process of its own (to be killed, frozen, restarted)."""
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "worker"],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start_worker(self) -> None:
        self.worker_stop = asyncio.Event()
        self.worker_task = asyncio.create_task(run_worker(self.settings, self.worker_stop))

    async def stop_worker(self) -> None:
        if self.worker_stop and self.worker_task:
            self.worker_stop.set()
            await asyncio.wait_for(self.worker_task, 30)
            self.worker_task = None

    async def wait_final(
        self, client: httpx.AsyncClient, batch_id: str, timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = await client.get(f"/v1/batches/{batch_id}")
            assert response.status_code == 200, f"{response.status_code}: {response.text}"
            batch: dict[str, Any] = response.json()
            if all(m["state"] in FINAL for m in batch["messages"]):
                return batch
            if time.monotonic() > deadline:
                raise AssertionError(f"batch not final after {timeout}s: {batch['counts']}")
            if self.worker_task and self.worker_task.done():
                self.worker_task.result()
            await asyncio.sleep(0.2)


async def submit_batch(
    client: httpx.AsyncClient, run: str, records: list[dict[str, Any]], key: str | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/settlements/batches",
        json={"records": records},
        headers={"X-Settlement-Run-ID": run, "Idempotency-Key": key or uuid.uuid4().hex},
    )


PipelineFactory = Callable[..., Any]


@pytest.fixture
async def pipeline_factory(infra: Infra) -> AsyncIterator[PipelineFactory]:
    made: list[Pipeline] = []

    async def build(
        *,
        worker: bool = True,
        sim: dict[str, Any] | None = None,
        intake_config: dict[str, Any] | None = None,
        database_user: str | None = None,
        **overrides: Any,
    ) -> Pipeline:
        infra.database_url = await fresh_database(infra)
        if database_user:  # the processes log in as this role, not as the superuser
            overrides["database_url"] = str(
                make_url(infra.database_url)
                .set(username=database_user)
                .render_as_string(hide_password=False)
            )
        settings = make_settings(infra, **overrides)
        await ensure_topics(
            settings.kafka_bootstrap_servers,
            settings.all_topics,
            settings.kafka_partitions,
            security=settings,
        )
        sim_config = SimConfig(
            client_id=settings.upstream_client_id,
            client_secret=settings.upstream_client_secret.get_secret_value(),
            signing_secret=settings.upstream_signing_secret.get_secret_value(),
            **(sim or {}),
        )
        sim_app = create_simulator(sim_config)
        sim_server = await Server(sim_app).start()
        settings = settings.model_copy(
            update={
                "upstream_url": sim_server.url,
                "upstream_token_url": f"{sim_server.url}/oauth/token",
            }
        )

        intake = await Server(intake_app(settings), **(intake_config or {})).start()
        pipe = Pipeline(infra, settings, sim_app.state.sim, sim_server, intake)
        made.append(pipe)
        if worker:
            await pipe.start_worker()
        return pipe

    yield build
    for pipe in made:
        for client in pipe.clients:
            await client.aclose()
        with contextlib.suppress(Exception):
            await pipe.stop_worker()
        await pipe.intake.stop()
        await pipe.sim_server.stop()
    for pipe in made:
        name = make_url(pipe.settings.database_url).database
        with contextlib.suppress(Exception):
            await _admin(infra.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    pipe: Pipeline = await pipeline_factory()
    return pipe
