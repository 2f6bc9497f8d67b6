"""`etrm-sync dev`: the whole system on this machine, on embedded defaults.

Tansu, embedded PostgreSQL (or ETRM_DATABASE_URL), migrations, topics, the ETRM simulator, the
intake and one worker; every required setting filled with generated development values (kept in
`.etrm-dev/`, so tokens survive a restart), printed, and written to `.etrm-dev/env` for `demo`
and `token`. Ctrl-C stops all of it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from ledger.db import migrate
from ops.dev.devkeys import generate_signing_key, mint_token
from ops.dev.stack import Broker, Database, free_port
from runtime.kafka import ensure_topics
from runtime.settings import KafkaSettings

STATE_DIR = Path(".etrm-dev")
ISSUER = "https://idp.etrm-sync.dev"
AUDIENCE = "etrm-sync"
CONSOLE_CLIENT_ID = "etrm-console"
DEMO_SIMULATOR = {
    "reject_contracts": "REJECT-*",
    "down_contracts": "OUTAGE-*",
    "drift_contracts": "DRIFT-*",
}


def _secrets(state: Path) -> dict[str, str]:
    path = state / "secrets.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    values = {
        "client_secret": secrets.token_urlsafe(24),
        "signing_secret": secrets.token_urlsafe(32),
        "message_key": secrets.token_urlsafe(32),
        "encryption_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "audit_key": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


def dev_environment(
    state: Path,
    *,
    kafka: str,
    database_url: str,
    intake_port: int,
    sim_port: int,
    metrics_port: int,
    idp_port: int | None = None,
) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    values = _secrets(state)
    pem = state / "etrm-dev-es256.pem"
    if not pem.exists():
        generate_signing_key(state)
    sim = f"http://127.0.0.1:{sim_port}"
    console = (
        {
            "ETRM_OIDC_ISSUER": f"http://127.0.0.1:{idp_port}",
            "ETRM_OIDC_CLIENT_ID": CONSOLE_CLIENT_ID,
            "ETRM_PUBLIC_BASE_URL": f"http://127.0.0.1:{intake_port}",
        }
        if idp_port
        else {}
    )
    return {
        **console,
        "ETRM_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "ETRM_KAFKA_ENABLE_IDEMPOTENCE": "false",
        "ETRM_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "ETRM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "ETRM_DATABASE_URL": database_url,
        "ETRM_INTAKE_HOST": "127.0.0.1",
        "ETRM_INTAKE_PORT": str(intake_port),
        "ETRM_WORKER_METRICS_PORT": str(metrics_port),
        "ETRM_UPSTREAM_URL": sim,
        "ETRM_UPSTREAM_TOKEN_URL": f"{sim}/oauth/token",
        "ETRM_UPSTREAM_CLIENT_ID": "etrm-sync-dev",
        "ETRM_UPSTREAM_CLIENT_SECRET": values["client_secret"],
        "ETRM_UPSTREAM_SIGNING_SECRET": values["signing_secret"],
        # Short retries so the demo's maintenance-window record is dead-lettered in seconds.
        "ETRM_UPSTREAM_MAX_ATTEMPTS": "4",
        "ETRM_UPSTREAM_RETRY_BUDGET_S": "20",
        "ETRM_UPSTREAM_BACKOFF_BASE_S": "0.2",
        "ETRM_UPSTREAM_BACKOFF_CAP_S": "2",
        "ETRM_JWKS_URL": str((state / "jwks.json").resolve()),
        "ETRM_JWT_ISSUER": ISSUER,
        "ETRM_JWT_AUDIENCE": AUDIENCE,
        "ETRM_MESSAGE_SIGNING_KEYS": f"dev1={values['message_key']}",
        "ETRM_ENCRYPTION_KEYS": f"dev1={values['encryption_key']}",
        "ETRM_AUDIT_SIGNING_KEY": values["audit_key"],
        "ETRM_AUDIT_CHECKPOINT_INTERVAL_S": "60",
        "ETRM_DEV_JWT_PRIVATE_KEY": str(pem.resolve()),
    }


def read_dev_env(state: Path = STATE_DIR) -> dict[str, str]:
    path = state / "env"
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


@dataclass
class DevStack:
    state: Path = STATE_DIR
    console: Console = field(default_factory=Console)
    broker: Broker | None = None
    database: Database | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.state / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    async def _wait_http(self, name: str, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                process = self.processes.get(name)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.state / (name + '.log')}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{name} not ready at {url}; see {self.state / (name + '.log')}")

    async def up(self) -> float:
        started = time.monotonic()
        self.state.mkdir(parents=True, exist_ok=True)
        kafka_port = free_port(9092)
        # Starting the servers waits on subprocesses: keep that off the event loop.
        self.broker = await asyncio.to_thread(Broker(kafka_port, self.state / "tansu.log").start)
        database_url = os.environ.get("ETRM_DATABASE_URL")
        if not database_url:
            self.database = await asyncio.to_thread(
                Database(self.state / "pg", free_port(55432)).start
            )
            database_url = self.database.url
        intake_port, sim_port, metrics_port = free_port(8080), free_port(8090), free_port(9108)
        idp_port = free_port(8070)
        self.env = dev_environment(
            self.state,
            kafka=self.broker.bootstrap,
            database_url=database_url,
            intake_port=intake_port,
            sim_port=sim_port,
            metrics_port=metrics_port,
            idp_port=idp_port,
        )
        (self.state / "env").write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        (self.state / "env").chmod(0o600)
        await migrate(database_url)
        topics = KafkaSettings(kafka_bootstrap_servers=self.broker.bootstrap)
        await ensure_topics(self.broker.bootstrap, topics.all_topics, topics.kafka_partitions)
        sim_args = [f"--{k.replace('_', '-')}={v}" for k, v in DEMO_SIMULATOR.items()]
        self._spawn("mock-etrm", "mock-etrm", "--port", str(sim_port), *sim_args)
        self._spawn(
            "dev-idp",
            "dev-idp",
            "--port",
            str(idp_port),
            "--client-id",
            CONSOLE_CLIENT_ID,
            "--redirect-uri",
            f"{self.env['ETRM_PUBLIC_BASE_URL']}/console/callback",
            "--private-key",
            self.env["ETRM_DEV_JWT_PRIVATE_KEY"],
            "--jwks",
            self.env["ETRM_JWKS_URL"],
        )
        self._spawn("intake", "intake")
        self._spawn("worker", "worker")
        await self._wait_http("mock-etrm", f"http://127.0.0.1:{sim_port}/healthz")
        await self._wait_http(
            "dev-idp", f"{self.env['ETRM_OIDC_ISSUER']}/.well-known/openid-configuration"
        )
        await self._wait_http("intake", f"http://127.0.0.1:{intake_port}/readyz")
        await self._wait_http("worker", f"http://127.0.0.1:{metrics_port}/healthz")
        return time.monotonic() - started

    def show(self, ready_s: float) -> None:
        token = mint_token(
            Path(self.env["ETRM_DEV_JWT_PRIVATE_KEY"]),
            issuer=ISSUER,
            audience=AUDIENCE,
            subject="trader-1",
            desk="power-east",
            scopes=["settlements:write", "settlements:read"],
            ttl_s=8 * 3600,
        )
        table = Table(title=f"etrm-sync dev stack ready in {ready_s:.1f}s")
        table.add_column("component")
        table.add_column("where")
        table.add_row("intake (HTTP API)", f"http://127.0.0.1:{self.env['ETRM_INTAKE_PORT']}")
        table.add_row(
            "worker /metrics /healthz", f"http://127.0.0.1:{self.env['ETRM_WORKER_METRICS_PORT']}"
        )
        table.add_row("operations console", f"{self.env['ETRM_PUBLIC_BASE_URL']}/console")
        table.add_row("dev identity provider", self.env["ETRM_OIDC_ISSUER"])
        table.add_row("ETRM simulator", self.env["ETRM_UPSTREAM_URL"])
        table.add_row("Kafka (Tansu)", self.env["ETRM_KAFKA_BOOTSTRAP_SERVERS"])
        table.add_row("PostgreSQL", self.env["ETRM_DATABASE_URL"])
        table.add_row("settings", f"{self.state / 'env'} (secrets; not printed)")
        table.add_row("logs", f"{self.state}/*.log")
        self.console.print(table)
        self.console.print("[bold]Token[/] (desk power-east, 8 h):")
        self.console.print(token, soft_wrap=True)
        port = self.env["ETRM_INTAKE_PORT"]
        base = self.env["ETRM_PUBLIC_BASE_URL"]
        self.console.print(
            "\n[bold]Console[/] (one click signs you in as a development operator):\n"
            f"  {base}/console/login?login_hint=ops-alice\n"
            f"  {base}/console/login?login_hint=ops-bob   (a second operator, for approvals)"
        )
        self.console.print(
            "\nTry:  uv run etrm-sync demo        (another terminal)\n"
            f"      curl -H 'Authorization: Bearer <token>' http://127.0.0.1:{port}/readyz\n"
            "Ctrl-C stops everything."
        )

    def down(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.broker:
            self.broker.stop()
        if self.database:
            self.database.stop()


async def run_dev(*, demo: bool, once: bool) -> int:
    stack = DevStack()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        ready = await stack.up()
        stack.show(ready)
        code = 0
        if demo:
            from ops.dev.demo import run_demo

            code = await run_demo(stack.env, stack.console)
        if not once:
            await stop.wait()
        return code
    finally:
        stack.console.print("stopping…")
        stack.down()
