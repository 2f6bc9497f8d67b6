"""`etrm-sync`: the one command line for running, operating and measuring etrm-sync."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from runtime.settings import SettingsError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Settlement sync from trading desks to the ETRM engine.",
)
err = Console(stderr=True, soft_wrap=True)

from ops.opscli import (  # noqa: E402 - registered right below
    audit_app,
    dlq,
    holds,
    keys_app,
    messages_app,
    replays_app,
    upstream_app,
)

app.add_typer(dlq, name="dlq")
app.add_typer(holds, name="holds")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(upstream_app, name="upstream")
app.add_typer(replays_app, name="replays")
app.add_typer(messages_app, name="messages")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"etrm-sync {version('etrm-sync')}")
        except PackageNotFoundError:
            print("etrm-sync (not installed as a package)")
        raise typer.Exit()


@app.callback()
def root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    """Settlement sync from trading desks to the ETRM engine."""


def _fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def _dev_tools() -> None:
    """The dev stack, simulator, demo and bench ship with the source, not the package."""
    try:
        import ops.dev  # noqa: F401
    except ImportError:
        _fail("development tools are not installed here (run from a checkout: uv run etrm-sync …)")


@app.command()
def dev(
    demo: Annotated[bool, typer.Option(help="Run the demo once the stack is up")] = False,
    once: Annotated[bool, typer.Option(help="Stop after start-up (and the demo)")] = False,
) -> None:
    """Everything on this machine: broker, database, simulator, intake, worker."""
    _dev_tools()
    from ops.dev.devstack import run_dev
    from runtime.logging import configure_logging

    configure_logging("dev", "WARNING")
    raise typer.Exit(asyncio.run(run_dev(demo=demo, once=once)))


@app.command()
def demo() -> None:
    """Submit sample batches to a running `etrm-sync dev` stack and show what became of them."""
    _dev_tools()
    from ops.dev.demo import run_demo
    from ops.dev.devstack import read_dev_env

    env = {**read_dev_env(), **{k: v for k, v in os.environ.items() if k.startswith("ETRM_")}}
    if "ETRM_DEV_JWT_PRIVATE_KEY" not in env:
        _fail("no running dev stack found (.etrm-dev/env); start `etrm-sync dev` first")
    raise typer.Exit(asyncio.run(run_demo(env)))


@app.command()
def intake(
    processes: Annotated[
        int,
        typer.Option(
            min=1, help="Processes sharing the port (one per core); /metrics is per process"
        ),
    ] = 1,
) -> None:
    """Serve the HTTP intake (ETRM_INTAKE_HOST:ETRM_INTAKE_PORT)."""
    import ssl

    import uvicorn

    from ingest.tls import ClientCertProtocol
    from ops.bootstrap import intake_app
    from runtime.logging import configure_logging
    from runtime.settings import IntakeSettings, load
    from runtime.tracing import setup_tracing

    settings = load(IntakeSettings)
    configure_logging("intake")
    setup_tracing("intake")
    client_ca = settings.tls_client_ca if settings.tls_cert else None
    uvicorn.run(
        intake_app(settings, warm=True) if processes == 1 else "ops.bootstrap:intake_app_from_env",
        factory=processes > 1,
        workers=processes if processes > 1 else None,
        host=settings.intake_host,
        port=settings.intake_port,
        log_level="warning",
        access_log=False,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        ssl_ca_certs=client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        http=ClientCertProtocol,
    )


@app.command()
def worker() -> None:
    """Consume both lanes and deliver to the ETRM upstream."""
    import uvloop

    from ops.bootstrap import run_worker
    from runtime.logging import configure_logging
    from runtime.settings import WorkerSettings, load
    from runtime.tracing import setup_tracing

    settings = load(WorkerSettings)
    configure_logging("worker")
    setup_tracing("worker")
    # uvloop, as uvicorn uses for the intake: cheaper sockets for the upstream calls and Kafka.
    uvloop.run(run_worker(settings))


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision (alembic upgrade head)."""
    from ledger.db import migrate as run_migrations
    from runtime.settings import DatabaseSettings, load

    settings = load(DatabaseSettings)
    asyncio.run(run_migrations(settings.database_url))
    Console().print("database schema is current")


@app.command("mock-etrm")
def mock_etrm(
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8090,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Added latency per POST")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of POSTs answered 503")] = 0.0,
    outage: Annotated[bool, typer.Option(help="Answer every POST 503")] = False,
    fail_first_attempts: Annotated[
        int, typer.Option(help="503 for the first N POSTs of every Idempotency-Key")
    ] = 0,
    reject_contracts: Annotated[
        str, typer.Option(help="Contract globs answered 422 (comma separated)")
    ] = "",
    down_contracts: Annotated[str, typer.Option(help="Contract globs always answered 503")] = "",
    drift_contracts: Annotated[
        str, typer.Option(help="Contract globs whose reconciled position drifts")
    ] = "",
    drift_fraction: Annotated[str, typer.Option()] = "0.02",
    token_ttl_s: Annotated[int, typer.Option()] = 300,
) -> None:
    """The ETRM simulator (token endpoint, Idempotency-Key dedup, faults, drift)."""
    _dev_tools()
    import uvicorn

    from ops.dev.simulator import SimConfig, create_simulator

    def globs(raw: str) -> list[str]:
        return [g.strip() for g in raw.split(",") if g.strip()]

    config = SimConfig(
        client_id=os.environ.get("ETRM_UPSTREAM_CLIENT_ID", "etrm-sync"),
        client_secret=os.environ.get("ETRM_UPSTREAM_CLIENT_SECRET", "dev-client-secret"),
        signing_secret=os.environ.get("ETRM_UPSTREAM_SIGNING_SECRET", ""),
        latency_ms=latency_ms,
        error_rate=error_rate,
        outage=outage,
        fail_first_attempts=fail_first_attempts,
        reject_contracts=globs(reject_contracts),
        down_contracts=globs(down_contracts),
        drift_contracts=globs(drift_contracts),
        drift_fraction=drift_fraction,
        token_ttl_s=token_ttl_s,
    )
    # httptools, not h11: the simulator shares the bench's two cores with what it measures
    uvicorn.run(
        create_simulator(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
    )


@app.command("dev-idp")
def dev_idp(
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8070,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    client_id: Annotated[str, typer.Option(help="The console's client id")] = "etrm-console",
    redirect_uri: Annotated[
        list[str], typer.Option(help="A registered redirect URI (repeatable)")
    ] = [],  # noqa: B006 - typer reads the default
    private_key: Annotated[Path, typer.Option(help="Signing key (PEM)")] = Path(
        ".etrm-dev/etrm-dev-es256.pem"
    ),
    jwks: Annotated[Path, typer.Option(help="Its public JWKS")] = Path(".etrm-dev/jwks.json"),
) -> None:
    """A development OpenID Connect provider for the console (one-click sign-in as a
    development operator). Access tokens carry ETRM_JWT_ISSUER and ETRM_JWT_AUDIENCE."""
    _dev_tools()
    import uvicorn

    from ops.dev.idp import IdpConfig, create_idp

    config = IdpConfig(
        issuer=f"http://{host}:{port}",
        client_id=client_id,
        redirect_uris=redirect_uri,
        private_key=private_key,
        jwks=jwks,
        api_issuer=os.environ.get("ETRM_JWT_ISSUER", ""),
        api_audience=os.environ.get("ETRM_JWT_AUDIENCE", ""),
    )
    uvicorn.run(
        create_idp(config), host=host, port=port, log_level="warning", access_log=False, http="h11"
    )


@app.command()
def token(
    desk: Annotated[str, typer.Option(help="The desk claim")] = "power-east",
    sub: Annotated[str, typer.Option(help="Trader or operator id")] = "trader-1",
    scope: Annotated[
        str, typer.Option(help="Space-separated scopes")
    ] = "settlements:write settlements:read",
    contracts: Annotated[str | None, typer.Option(help="Comma-separated contract patterns")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 3600,
    key: Annotated[
        Path | None,
        typer.Option(help="Private key (PEM: EC P-256, RSA or Ed25519); default: the dev stack's"),
    ] = None,
    kid: Annotated[
        str | None, typer.Option(help="Key id in the JWKS; default: the PEM's stem")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="iss; default ETRM_JWT_ISSUER")] = None,
    audience: Annotated[str | None, typer.Option(help="aud; default ETRM_JWT_AUDIENCE")] = None,
    new_key: Annotated[
        Path | None,
        typer.Option(help="First write a new key pair here (<kid>.pem and jwks.json) and use it"),
    ] = None,
) -> None:
    """Mint a token: with the dev stack's key, or with any key whose public half is in the
    JWKS the intake reads (ETRM_JWKS_URL), e.g. the compose stack's ./jwks.json."""
    _dev_tools()
    from ops.dev.devkeys import DEV_KID, algorithm_of, generate_signing_key, mint_token
    from ops.dev.devstack import read_dev_env

    env = {**read_dev_env(), **{k: v for k, v in os.environ.items() if k.startswith("ETRM_")}}
    if new_key is not None:
        key, jwks = generate_signing_key(new_key, kid or "etrm-compose-es256")
        err.print(f"wrote {key} (private, keep it) and {jwks} (give it to the intake)")
    if key is None:
        dev_key = env.get("ETRM_DEV_JWT_PRIVATE_KEY")
        if not dev_key or not Path(dev_key).exists():
            _fail("no signing key: pass --key PEM (or --new-key DIR), or start `etrm-sync dev`")
        key, kid = Path(str(dev_key)), kid or DEV_KID
    issuer = issuer or env.get("ETRM_JWT_ISSUER")
    audience = audience or env.get("ETRM_JWT_AUDIENCE")
    if not issuer or not audience:
        _fail("--issuer and --audience are needed (or ETRM_JWT_ISSUER / ETRM_JWT_AUDIENCE)")
    pem = key.read_bytes()
    print(
        mint_token(
            pem,
            issuer=str(issuer),
            audience=str(audience),
            subject=sub,
            desk=desk,
            scopes=scope.split(),
            contracts=[c.strip() for c in contracts.split(",")] if contracts else None,
            ttl_s=ttl,
            kid=kid or key.stem,
            algorithm=algorithm_of(pem),
        )
    )


@app.command()
def bench(
    scenario: Annotated[list[str] | None, typer.Option(help="Run only these (repeat)")] = None,
    scale: Annotated[int, typer.Option(help="Records per unit of work")] = 1000,
    runs: Annotated[int, typer.Option(help="Repeat and report the median of each row")] = 1,
) -> None:
    """Measure every stage against a baseline run in the same process; table, JSON, PNG."""
    _dev_tools()
    from ops.dev.bench import SCENARIOS, run_bench

    unknown = set(scenario or []) - set(SCENARIOS)
    if unknown:
        _fail(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    asyncio.run(run_bench(scenario or list(SCENARIOS), scale, runs))


@app.command()
def chaos(
    minutes: Annotated[float, typer.Option(help="How long to inject faults")] = 20.0,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the fault schedule")] = 1,
    workers: Annotated[int, typer.Option(help="Workers at the start")] = 2,
) -> None:
    """The fault-injection run of the delivery guarantees (issue #6), with its checker."""
    _dev_tools()
    from ops.dev.chaos import main as chaos_main

    raise typer.Exit(asyncio.run(chaos_main(minutes=minutes, seed=seed, workers=workers)))


def main() -> None:
    from ledger.db import SchemaAhead, SchemaBehind

    try:
        app()
    except (SettingsError, SchemaBehind, SchemaAhead) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
