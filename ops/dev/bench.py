"""`etrm-sync bench`: every stage measured against a baseline run in the same process, on the
same broker, database and simulator, so a noisy shared machine cancels out in the ratio.

Starts its own Tansu and embedded PostgreSQL (or uses ETRM_DATABASE_URL), runs the scenarios,
prints a table and writes JSON to bench-results/. Also runnable as `python -m ops.bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from aiokafka import AIOKafkaConsumer
from httpx_aiohttp import AiohttpTransport
from rich.console import Console
from rich.table import Table

from ingest.publisher import SettlementPublisher
from ledger import acceptance
from ledger.crypto import PayloadCipher
from ledger.db import make_engine, migrate
from ledger.rows import Actor
from ops.bootstrap import lane_sealer
from ops.dev.devkeys import generate_signing_key, mint_token
from ops.dev.stack import Broker, Database, free_port, isolated_settings
from runtime.kafka import KafkaPublisher, ensure_topics, make_producer
from runtime.settings import StackSettings, settings_env
from schemas import samples
from schemas.envelope import Envelope, envelope_for, lane_for, validate_record
from workers.upstream import HttpPool

T = TypeVar("T")
RESULTS = Path("bench-results")
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Row:
    scenario: str
    measured: str
    value: float
    baseline: float | None
    unit: str
    target: str = ""
    # Over several runs: the median of each run's own ratio (noise cancels within a run,
    # which a ratio of medians taken from different runs would not do).
    median_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.median_ratio is not None:
            return self.median_ratio
        if self.baseline in (None, 0):
            return None
        assert self.baseline is not None
        return self.value / self.baseline


def direct_request(
    envelopes: list[Envelope],
    publisher: SettlementPublisher,
    *,
    desk: str,
    trader: str,
    run_id: str = "BENCH",
) -> acceptance.Request:
    """A batch of `envelopes` as the intake would record it, to accept without HTTP (the bench's
    backlogs; tests that must control the order in which requests reach the broker)."""
    batch_id = f"batch_{uuid.uuid4().hex}"
    return acceptance.Request(
        batch_id=batch_id,
        desk=desk,
        trader=trader,
        settlement_run_id=run_id,
        idempotency_key=batch_id,
        request_hash=batch_id,
        trace_id=uuid.uuid4().hex,
        resource_kind="batch",
        resource_id=batch_id,
        status_url=f"/v1/batches/{batch_id}",
        records=[
            acceptance.RecordToAccept(
                i,
                e.message_id,
                e.identity,
                e.contract_id,
                e.market,
                e.revision,
                publisher.topic_for(e),
                e.position_mwh,
                e.value,
            )
            for i, e in enumerate(envelopes)
        ],
        pending_lease_s=300.0,
        key_lease_s=300.0,
    )


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.broker: Broker | None = None
        self.database: Database | None = None
        self.database_url = os.environ.get("ETRM_DATABASE_URL", "")
        self.rows: list[Row] = []
        self.signing_secret = secrets.token_urlsafe(16)
        self.client_secret = secrets.token_urlsafe(16)
        self.processes: list[subprocess.Popen[bytes]] = []

    # -- infrastructure ------------------------------------------------------------------------

    async def up(self) -> None:
        generate_signing_key(self.root)  # the desks' token key (the intake trusts its JWKS)
        self.broker = await asyncio.to_thread(Broker(free_port(), self.root / "tansu.log").start)
        if not self.database_url:
            self.database = await asyncio.to_thread(Database(self.root / "pg", free_port()).start)
            self.database_url = self.database.url
        await migrate(self.database_url)

    def down(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.broker:
            self.broker.stop()
        if self.database:
            self.database.stop()

    def settings(self, sim_url: str, **overrides: Any) -> StackSettings:
        assert self.broker is not None
        return isolated_settings(
            self.broker.bootstrap,
            self.database_url,
            "bench",
            upstream_url=sim_url,
            upstream_token_url=f"{sim_url}/oauth/token",
            upstream_client_id="bench",
            upstream_client_secret=self.client_secret,
            upstream_signing_secret=self.signing_secret,
            jwks_url=str(self.root / "jwks.json"),
            jwt_issuer="bench",
            jwt_audience="bench",
            **overrides,
        )

    def spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=(self.root / f"{args[0]}.log").open("ab"),
        )
        self.processes.append(process)
        return process

    def workers(self, settings: StackSettings, count: int) -> list[subprocess.Popen[bytes]]:
        """`count` worker processes of one group, each with a metrics port of its own."""
        return [
            self.spawn(
                ["worker"],
                settings_env(settings.model_copy(update={"worker_metrics_port": free_port()})),
            )
            for _ in range(count)
        ]

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def simulator(self, latency_ms: float) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        env = {
            "ETRM_UPSTREAM_CLIENT_ID": "bench",
            "ETRM_UPSTREAM_CLIENT_SECRET": self.client_secret,
        }
        process = self.spawn(
            [
                "mock-etrm",
                "--port",
                str(port),
                "--latency-ms",
                str(latency_ms),
                "--token-ttl-s",
                "3600",
            ],
            env,
        )
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/healthz")
        return url, process

    async def intake(
        self, settings: StackSettings, processes: int = 1
    ) -> tuple[str, str, subprocess.Popen[bytes]]:
        """An intake (of `processes` processes) on its own port; its URL and a desk token."""
        pem = self.root / "etrm-dev-es256.pem"
        port = free_port()
        env = settings_env(
            settings.model_copy(
                update={
                    "intake_port": port,
                    "desk_rate_limit": "100000:100000",
                    "desk_record_rate_limit": "10000000:10000000",
                }
            )
        )
        process = self.spawn(["intake", "--processes", str(processes)], env)
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/readyz", process=process)
        await until_started(process)
        token = mint_token(
            pem,
            issuer="bench",
            audience="bench",
            subject="bench-trader",
            desk="bench-desk",
            scopes=["settlements:write", "settlements:read"],
        )
        return url, token, process

    # -- workload ------------------------------------------------------------------------------

    @staticmethod
    def envelopes(count: int, contracts: int) -> list[Envelope]:
        run = samples.run_id()
        result = []
        for raw in samples.mixed_batch(run, count, contracts=contracts, prefix=contract_prefix()):
            record = validate_record(raw, 0)
            assert not isinstance(record, list), record
            result.append(envelope_for("bench-desk", record))
        return result

    @staticmethod
    async def preload(settings: StackSettings, envelopes: list[Envelope], partitions: int) -> None:
        """Accept the records as the intake does (ledger first, then the broker), without the
        HTTP cost: the backlog a worker scenario drains."""
        await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, partitions)
        slow = settings.model_copy(update={"kafka_publish_timeout_s": 120.0})
        kafka = KafkaPublisher(slow)
        engine = make_engine(settings.database_url, 2)
        cipher = PayloadCipher(settings.encryption_keyring())
        publisher = SettlementPublisher(kafka, slow.lanes, lane_sealer(slow, cipher))
        try:
            for start in range(0, len(envelopes), 5000):
                chunk = envelopes[start : start + 5000]
                request = direct_request(chunk, publisher, desk="bench-desk", trader="bench")
                batch_id = request.batch_id
                begun = await acceptance.begin(engine, request, cipher)
                assert isinstance(begun, acceptance.Pending), begun
                await publisher.publish(
                    chunk,
                    desk="bench-desk",
                    trader="bench",
                    trace_id=request.trace_id,
                    batch_id=batch_id,
                )
                assert await acceptance.complete(
                    engine, request, Actor("system", "bench"), len(chunk)
                )
        finally:
            await kafka.stop()
            await engine.dispose()


def dump_stacks(process: subprocess.Popen[bytes]) -> None:
    """What a process that stopped making progress is doing (py-spy, from the dev tools)."""
    spy = Path(sys.executable).parent / "py-spy"
    if process.poll() is not None:
        console.print(f"process {process.pid} exited with {process.returncode}")
    elif spy.exists():
        done = subprocess.run(
            [str(spy), "dump", "--pid", str(process.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        console.print(done.stdout[-20000:] or done.stderr[-2000:])


async def wait_http(
    url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process for {url} exited with {process.returncode}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def poller() -> httpx.AsyncClient:
    """The bench's one client for polling the simulator, per event loop. A new
    `httpx.AsyncClient` builds an SSL context and loads the CA bundle (~20 ms of CPU, even for
    http:// URLs): one per poll, 5 polls a second while a drain is timed, took ~10 % of a core
    from the two cores the measured processes share."""
    loop = asyncio.get_running_loop()
    client = _POLLERS.get(loop)
    if client is None:
        client = _POLLERS[loop] = httpx.AsyncClient(timeout=10.0)
    return client


async def sim_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = (await poller().get(f"{url}/_sim/stats")).json()
    return stats


async def reset_sim(url: str) -> None:
    await poller().post(f"{url}/_sim/reset")


@dataclass(frozen=True, slots=True)
class Drain:
    rate: float  # records/s between the first and the last effect the simulator saw
    cpu_ms: float | None  # CPU of the delivering process per effect while it drained


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    total: float = times.user + times.system
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


async def drain(
    url: str,
    expected: int,
    timeout: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    task: asyncio.Task[None] | None = None,
    cpu_of: int | None = None,
) -> Drain:
    """Wait for `expected` effects; with `cpu_of` (a pid), also the CPU that process spent per
    effect, from the first poll that saw effects to the one that saw them all (its start-up
    excluded)."""
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None  # (cpu, effects) when effects were first seen
    while True:
        stats = await sim_stats(url)
        if cpu_of is not None and first is None and stats["effects"] > 0:
            first = (cpu_seconds(cpu_of), stats["effects"])
        if stats["effects"] >= expected:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {stats['effects']} of {expected} effects")
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}")
        if task is not None and task.done():
            task.result()  # raises what stopped the baseline
            raise RuntimeError("baseline consumer stopped early")
        await asyncio.sleep(0.2)
    cpu_ms = None
    if cpu_of is not None and first is not None and stats["effects"] > first[1]:
        cpu_ms = (cpu_seconds(cpu_of) - first[0]) * 1000 / (stats["effects"] - first[1])
    span = stats["last_effect_at"] - stats["first_effect_at"]
    return Drain((expected - 1) / span if span > 0 else float("inf"), cpu_ms)


async def baseline_consumer(settings: StackSettings, expected: int, concurrency: int) -> None:
    """The floor to compare with: getmany + concurrent posts; no ledger, no signing, no
    ordering, no retries."""
    consumer = AIOKafkaConsumer(
        *settings.lanes.values(),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"{settings.kafka_group_id}-baseline",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    # The worker's HTTP pool (httpx on aiohttp's transport), used as a person writing this loop
    # would: `client.post`. The worker hands its POST to the same transport directly (dd0df68).
    http = HttpPool(concurrency, 30.0)
    try:
        assert settings.upstream_token_url
        assert settings.upstream_url
        token = (
            await http.post(
                settings.upstream_token_url,
                data={"grant_type": "client_credentials"},
                auth=("bench", settings.upstream_client_secret.get_secret_value()),
            )
        ).json()["access_token"]
        url = settings.upstream_url + "/api/v1/settlements/sync"
        slots = asyncio.Semaphore(concurrency)

        async def post(value: bytes, key: str) -> None:
            headers = {
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": key,
                "Content-Type": "application/json",
            }
            async with slots:
                for _ in range(5):  # even a floor has to survive a dropped connection
                    try:
                        await http.post(url, content=value, headers=headers)
                        return
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)

        await consumer.start()
        done = 0
        try:
            while done < expected:
                polled = await consumer.getmany(timeout_ms=100, max_records=500)
                records = [r for batch in polled.values() for r in batch]
                await asyncio.gather(
                    *(post(r.value, dict(r.headers)["message_id"].decode()) for r in records)
                )
                await consumer.commit()
                done += len(records)
        finally:
            await consumer.stop()
    finally:
        await http.aclose()


def _baseline_process(settings: StackSettings, expected: int, concurrency: int) -> None:
    asyncio.run(baseline_consumer(settings, expected, concurrency))


async def baseline_drain(
    settings: StackSettings, sim_url: str, expected: int, concurrency: int
) -> Drain:
    """The baseline consumer in a process of its own, so its CPU is measured as the worker's
    is (the bench's own polling and printing not counted)."""
    process = multiprocessing.get_context("spawn").Process(
        target=_baseline_process, args=(settings, expected, concurrency), daemon=True
    )
    process.start()
    try:
        assert process.pid is not None
        return await drain(sim_url, expected, timeout=600, cpu_of=process.pid)
    finally:
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()


# -- scenarios --------------------------------------------------------------------------------


async def worker_throughput(
    bench: Bench,
    *,
    records: int,
    latency_ms: float,
    concurrency: int,
    partitions: int = 4,
    contracts: int = 500,
    label: str = "worker throughput",
    throughput: str = ">= 0.7 x baseline",
    cpu: bool = True,
) -> list[Row]:
    sim_url, sim = await bench.simulator(latency_ms)
    try:
        settings = bench.settings(sim_url, worker_concurrency=concurrency)
        await bench.preload(settings, bench.envelopes(records, contracts), partitions)
        baseline = await baseline_drain(settings, sim_url, records, concurrency)
        await reset_sim(sim_url)
        worker = bench.spawn(["worker"], settings_env(settings))
        try:
            measured = await drain(sim_url, records, timeout=600, process=worker, cpu_of=worker.pid)
        finally:
            await bench.stop(worker)
    finally:
        await bench.stop(sim)
    name = f"{label}, {latency_ms:.0f} ms upstream, C={concurrency}"
    rows = [Row(name, "records/s delivered", measured.rate, baseline.rate, "rec/s", throughput)]
    if cpu and measured.cpu_ms is not None and baseline.cpu_ms is not None:
        rows.append(
            Row(
                f"worker CPU per delivery, {latency_ms:.0f} ms upstream, C={concurrency}",
                "CPU per delivery (baseline: per POST of the bare loop)",
                measured.cpu_ms * 1000,
                baseline.cpu_ms * 1000,
                "us",
                "<= 1.5 x baseline",
            )
        )
    return rows


def contract_prefix() -> str:
    """Contracts of their own for each batch of work: the scenarios share one database, and a
    record waits for every earlier record of its contract (a backlog a previous scenario left
    undelivered would hold the next one's records for ever)."""
    return "B" + uuid.uuid4().hex[:7].upper()


def batch_bodies(count: int, size: int) -> list[tuple[str, bytes]]:
    """`count` batch bodies of `size` distinct records each, with their run ids."""
    bodies = []
    prefix = contract_prefix()
    for _ in range(count):
        run = samples.run_id()
        records = samples.mixed_batch(run, size, contracts=max(1, size // 4), prefix=prefix)
        bodies.append((run, json.dumps({"records": records}).encode()))
    return bodies


async def post_batches(
    url: str, token: str, bodies: list[tuple[str, bytes]], clients: int
) -> float:
    """Submit every body with `clients` concurrent connections; returns seconds taken."""
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client() -> None:
        async with load_client(url, 120.0) as http:
            while not queue.empty():
                run, body = queue.get_nowait()
                response = await http.post(
                    "/v1/settlements/batches",
                    content=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                        "X-Settlement-Run-ID": run,
                        "Idempotency-Key": uuid.uuid4().hex,
                    },
                )
                if response.status_code != 202:
                    raise RuntimeError(
                        f"intake answered {response.status_code}: {response.text[:200]}"
                    )

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


async def raw_producer_seconds(settings: StackSettings, envelopes: list[Envelope]) -> float:
    """The same serialized records straight into the broker: pipelined sends, acks=all; the
    producer connected and the topic known first (one record sent and acknowledged), as the
    intake is before it is timed (its warm-up request)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        warm = envelopes[0]
        await producer.send_and_wait(
            settings.topic_standard, value=warm.value, key=warm.contract_id.encode()
        )
        started = time.perf_counter()
        pending = [
            await producer.send(settings.topic_standard, value=e.value, key=e.contract_id.encode())
            for e in envelopes
        ]
        await asyncio.gather(*pending)
        return time.perf_counter() - started
    finally:
        await producer.stop()


THROUGHPUT_TRIES = 3
LOCK_SAMPLE_S = 0.01


async def lock_wait_seconds(database_url: str, stop: asyncio.Event) -> float:
    """Until `stop`: how long the sessions of the database at `database_url` spent waiting on
    a lock (a heavyweight lock: advisory, row, transaction id, relation), from
    `pg_stat_activity` sampled about every LOCK_SAMPLE_S — each sample's count of sessions
    waiting, times the time since the one before."""
    from sqlalchemy import text

    engine = make_engine(database_url, 1)
    waited = 0.0
    try:
        async with engine.connect() as conn:
            # A statement of its own each: within one transaction Postgres answers every read
            # of pg_stat_activity from the snapshot the first one took.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            last = time.perf_counter()
            while not stop.is_set():
                waiting = await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
                now = time.perf_counter()
                waited += int(waiting or 0) * (now - last)
                last = now
                await asyncio.sleep(LOCK_SAMPLE_S)
    finally:
        await engine.dispose()
    return waited


async def intake_cost(url: str, token: str) -> dict[int, float]:
    """Microseconds of wall time per record, one client sending batches of each size."""
    per_record: dict[int, float] = {}
    for size in (1, 10, 100, 1000, 5000):
        repeats = max(3, min(50, 5000 // size))
        sized = batch_bodies(repeats, size)
        spent = await post_batches(url, token, sized, clients=1)
        per_record[size] = spent / (repeats * size) * 1e6
    return per_record


def cost_rows(micros: dict[int, float], baselines: dict[int, float], label: str) -> list[Row]:
    """The intake's cost by batch size (`intake_cost`), each against its baseline: the batch of
    1 of the same intake, or the same size on 1 intake process (`label` says which)."""
    target = (
        "report (one client: one request at a time)" if label else "flat or falling with batch size"
    )
    return [
        Row(
            f"intake cost, batch of {size}{label}",
            f"us per record ({1e6 / value:,.0f} rec/s)",
            value,
            baselines[size],
            "us",
            target,
        )
        for size, value in micros.items()
    ]


async def scenario_intake(bench: Bench, scale: int) -> list[Row]:
    sim_url, sim = await bench.simulator(0)
    settings = bench.settings(sim_url)
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    url, token, intake = await bench.intake(settings)
    rows = []
    try:
        batches = max(4, (10 * scale) // 500)
        bodies = batch_bodies(batches, 500)
        await post_batches(url, token, bodies[:1], 1)  # warm-up: connections, JIT caches
        accepted = (batches - 1) * 500
        # Each side's best of THROUGHPUT_TRIES: Tansu now and then holds a produce request's
        # answer for ~100-200 ms, and one such pause in the raw producer's ~0.12 s halved its
        # rate (~41,000 against ~80,000 records/s in 3 of 8 runs in a row), which doubled
        # intake ÷ raw in the runs it hit.
        intake_rates = [accepted / await post_batches(url, token, bodies[1:], clients=4)]
        for _ in range(THROUGHPUT_TRIES - 1):
            more = batch_bodies(batches - 1, 500)  # new records: accepted and published anew
            intake_rates.append(accepted / await post_batches(url, token, more, clients=4))
        envelopes = bench.envelopes(accepted, 500)
        raw_rates = [
            accepted / await raw_producer_seconds(settings, envelopes)
            for _ in range(THROUGHPUT_TRIES)
        ]
        rows.append(
            Row(
                "intake throughput, batches of 500, 4 clients",
                f"records/s accepted, best of {THROUGHPUT_TRIES} (intake "
                + " / ".join(f"{r:,.0f}" for r in intake_rates)
                + "; raw "
                + " / ".join(f"{r:,.0f}" for r in raw_rates)
                + ")",
                max(intake_rates),
                max(raw_rates),
                "rec/s",
                ">= 0.5 x raw aiokafka producer",
            )
        )
        # The same load again, with the database's lock waits sampled (apart from the run
        # above: the sampling's own queries would weigh on the figure it reports).
        sampled = batch_bodies(max(16, batches // 2), 500)
        stop = asyncio.Event()
        sampler = asyncio.create_task(lock_wait_seconds(settings.database_url, stop))
        try:
            await post_batches(url, token, sampled, clients=4)
        finally:
            stop.set()
        waited = await sampler
        rows.append(
            Row(
                "lock wait per acceptance, batches of 500, 4 clients",
                f"ms waiting on a lock ({len(sampled)} requests; pg_stat_activity every "
                f"{LOCK_SAMPLE_S * 1000:.0f} ms)",
                waited / len(sampled) * 1000,
                None,
                "ms",
                "report (no lock on the hot path)",
            )
        )
        per_record = await intake_cost(url, token)
        rows += cost_rows(per_record, dict.fromkeys(per_record, per_record[1]), "")
    finally:
        await bench.stop(intake)
    url, token, intake = await bench.intake(settings, 2)
    try:
        await post_batches(url, token, bodies[:1], 1)
        two = await intake_cost(url, token)
        rows += cost_rows(two, per_record, ", 2 intake processes vs 1")
    finally:
        await bench.stop(intake)
        await bench.stop(sim)
    return rows


async def until_started(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until a process and everything it started (an intake's worker processes import their
    code for a second or two after it answers /readyz) has gone quiet: measurements start from
    a steady state, not from start-up CPU on the same two cores."""
    import psutil

    root = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        total = 0.0
        for member in [root, *root.children(recursive=True)]:
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        if last >= 0 and total - last < 0.05:
            return
        last = total
        await asyncio.sleep(0.5)


def load_client(url: str, timeout: float) -> httpx.AsyncClient:
    """The bench's load generator: the httpx API on aiohttp's transport, as the workers use.
    With httpx's own transport the generator spent 0.97 ms of CPU per single-record request
    against 0.61 ms with this one (measured in one process under 16 clients), on the same two
    cores as the intake it measures."""
    return httpx.AsyncClient(
        base_url=url, timeout=timeout, transport=AiohttpTransport(trust_env=False), trust_env=False
    )


async def post_single(
    http: httpx.AsyncClient, token: str, prefix: str, i: int
) -> tuple[float, str]:
    """One single-record submission (a real-time price): seconds until its 202, message id."""
    run = samples.run_id()
    record = samples.canonical(run, f"{prefix}-{uuid.uuid4().hex[:10]}", hour=i % 24)
    started = time.perf_counter()
    response = await http.post(
        "/v1/settlements/sync",
        json=record,
        headers={"Authorization": f"Bearer {token}", "X-Settlement-Run-ID": run},
    )
    if response.status_code != 202:
        raise RuntimeError(f"intake answered {response.status_code}")
    return time.perf_counter() - started, str(response.json()["message_id"])


async def single_latencies(url: str, token: str, count: int, rate: float) -> list[float]:
    """Single-record submissions at a fixed rate; seconds per request."""
    latencies: list[float] = []
    async with load_client(url, 30.0) as http:

        async def one(i: int) -> None:
            latencies.append((await post_single(http, token, "LAT", i))[0])

        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return latencies


LATENCY_ROUNDS = 4


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def scenario_latency(bench: Bench, scale: int) -> list[Row]:
    """p50/p99 of single submissions while a worker delivers to a healthy, a down and a slow
    upstream: the desk's answer must not depend on the upstream.

    The three conditions take turns, in LATENCY_ROUNDS rounds: one block of 200 each made
    every p99 the second-largest of one 5-second stretch, on a machine whose speed drifts
    (the same code measured 0.57 to 1.46 x healthy)."""
    sim_url, sim = await bench.simulator(0)
    settings = bench.settings(sim_url)
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    url, token, intake = await bench.intake(settings)
    worker = bench.spawn(["worker"], settings_env(settings))
    distributions: dict[str, list[float]] = {}
    try:
        await single_latencies(url, token, 20, 50)  # warm-up
        per_round = max(50, scale // 10)
        async with httpx.AsyncClient(timeout=10.0) as http:
            for _ in range(LATENCY_ROUNDS):
                for label, config in (
                    ("healthy", {"outage": False, "latency_ms": 0}),
                    ("upstream down", {"outage": True, "latency_ms": 0}),
                    ("upstream 500 ms", {"outage": False, "latency_ms": 500}),
                ):
                    await http.patch(f"{sim_url}/_sim/config", json=config)
                    distributions.setdefault(label, []).extend(
                        await single_latencies(url, token, per_round, rate=40)
                    )
    finally:
        await bench.stop(worker)
        await bench.stop(intake)
        await bench.stop(sim)
    healthy = distributions["healthy"]
    rows = []
    for label, values in distributions.items():
        rows.append(
            Row(
                f"single submission p50, {label}",
                "latency",
                percentile(values, 0.5) * 1000,
                percentile(healthy, 0.5) * 1000,
                "ms",
            )
        )
        rows.append(
            Row(
                f"single submission p99, {label}",
                "latency",
                percentile(values, 0.99) * 1000,
                percentile(healthy, 0.99) * 1000,
                "ms",
                "<= 1.2 x healthy" if label == "upstream down" else "",
            )
        )
    plot_latencies(distributions)
    return rows


def plot_latencies(distributions: dict[str, list[float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev group
        console.print("matplotlib not installed: no latency plot")
        return
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, values in distributions.items():
        axis.hist([v * 1000 for v in values], bins=50, histtype="step", label=label)
    axis.set_xlabel("intake latency per single-record submission (ms)")
    axis.set_ylabel("requests")
    axis.set_title("Intake latency does not depend on the upstream")
    axis.legend()
    RESULTS.mkdir(exist_ok=True)
    figure.savefig(RESULTS / "intake-latency.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


async def scenario_scale_out(bench: Bench, scale: int) -> list[Row]:
    sim_url, sim = await bench.simulator(20)
    rows = []
    try:
        rates = {}
        for workers in (1, 2):
            await reset_sim(sim_url)
            settings = bench.settings(sim_url, worker_concurrency=64)
            records = 3 * scale
            await bench.preload(settings, bench.envelopes(records, 500), 4)
            processes = bench.workers(settings, workers)
            try:
                drained = await drain(sim_url, records, timeout=600, process=processes[0])
                rates[workers] = drained.rate
            finally:
                for process in processes:
                    await bench.stop(process)
        rows.append(
            Row(
                "scale out: 2 workers vs 1, 4 partitions, 20 ms upstream",
                "records/s delivered",
                rates[2],
                rates[1],
                "rec/s",
                "report (2 cores)",
            )
        )
    finally:
        await bench.stop(sim)
    return rows


async def scenario_memory(bench: Bench, scale: int) -> list[Row]:
    import psutil

    sim_url, sim = await bench.simulator(0)
    try:
        settings = bench.settings(sim_url)
        backlog = 100 * scale
        await bench.preload(settings, bench.envelopes(backlog, 2000), 4)
        worker = bench.spawn(["worker"], settings_env(settings))
        watched = psutil.Process(worker.pid)
        peak, started = 0, time.monotonic()
        try:
            while time.monotonic() - started < 45:
                peak = max(peak, watched.memory_info().rss)
                await asyncio.sleep(0.25)
            drained = (await sim_stats(sim_url))["effects"]
        finally:
            await bench.stop(worker)
    finally:
        await bench.stop(sim)
    return [
        Row(
            f"worker peak RSS draining a {backlog:,}-record backlog for 45 s",
            f"peak RSS ({drained:,} delivered)",
            peak / 2**20,
            None,
            "MiB",
            "< 300 MiB",
        )
    ]


async def priority_latencies(
    url: str, token: str, sim_url: str, count: int, rate: float
) -> list[float]:
    """Real-time price records (the priority lane) submitted one at a time at `rate`; seconds
    from each 202 to its effect at the upstream."""
    answered: dict[str, float] = {}
    async with load_client(url, 30.0) as http:
        for i in range(count):
            _, message_id = await post_single(http, token, "RT-PRI", i)
            answered[message_id] = time.time()
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 300
        while True:
            effects = (await http.post(f"{sim_url}/_sim/effects", json=list(answered))).json()
            if len(effects) == len(answered):
                return [effects[k]["received_at"] - at for k, at in answered.items()]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(answered) - len(effects)} priority records not delivered")
            await asyncio.sleep(0.2)


def standard_envelopes(count: int, contracts: int) -> list[Envelope]:
    """A backlog for the standard lane only (no real-time prices in it)."""
    found: list[Envelope] = []
    while len(found) < count:
        found.extend(
            e for e in Bench.envelopes(count, contracts) if lane_for(e.market) == "standard"
        )
    return found[:count]


async def scenario_priority(bench: Bench, scale: int) -> list[Row]:
    """Issue #8: priority records' time from 202 to delivered behind a standard backlog of
    20 x scale records, against the same on an idle system (same worker, same upstream)."""
    sim_url, sim = await bench.simulator(20)
    settings = bench.settings(sim_url, worker_concurrency=64)
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    url, token, intake = await bench.intake(settings)
    backlog = 20 * scale
    samples_per_phase = 40
    try:
        worker = bench.spawn(["worker"], settings_env(settings))
        try:
            await priority_latencies(url, token, sim_url, 10, 10)  # warm-up
            idle = await priority_latencies(url, token, sim_url, samples_per_phase, 5)
        finally:
            await bench.stop(worker)
        await bench.preload(settings, standard_envelopes(backlog, 500), 4)
        before = (await sim_stats(sim_url))["effects"]
        worker = bench.spawn(["worker"], settings_env(settings))
        try:
            for _ in range(600):  # until draining has begun (a minute at most)
                if (await sim_stats(sim_url))["effects"] >= before + 200:
                    break
                await asyncio.sleep(0.1)
            else:
                dump_stacks(worker)
                raise TimeoutError("the worker did not start draining the backlog")
            loaded = await priority_latencies(url, token, sim_url, samples_per_phase, 5)
            left = backlog - ((await sim_stats(sim_url))["effects"] - before - samples_per_phase)
        finally:
            await bench.stop(worker)
    finally:
        await bench.stop(intake)
        await bench.stop(sim)
    console.print(
        f"priority lane: idle p90 {percentile(idle, 0.9) * 1000:.0f} ms, behind the backlog "
        f"p90 {percentile(loaded, 0.9) * 1000:.0f} ms; {max(0, left):,} standard records were "
        "still waiting when the last priority record was delivered"
    )
    label = f"priority lane behind a {backlog:,}-record standard backlog, 20 ms upstream"
    return [
        Row(
            f"{label}, p50",
            "202 -> delivered",
            percentile(loaded, 0.5) * 1000,
            percentile(idle, 0.5) * 1000,
            "ms",
            "baseline: the same on an idle system",
        ),
        Row(
            f"{label}, p90",
            "202 -> delivered",
            percentile(loaded, 0.9) * 1000,
            percentile(idle, 0.9) * 1000,
            "ms",
            "<= 5 x idle",
        ),
    ]


async def single_closed_loop(url: str, token: str, clients: int, each: int) -> list[float]:
    """`clients` desks each sending single records one after another; seconds per request."""
    latencies: list[float] = []

    async def desk(c: int) -> None:
        async with load_client(url, 30.0) as http:
            for i in range(each):
                latencies.append((await post_single(http, token, f"SGL-{c}", i))[0])

    await asyncio.gather(*(desk(c) for c in range(clients)))
    return latencies


async def floor_latencies(settings: StackSettings, count: int) -> tuple[list[float], list[float]]:
    """What one single-record acceptance cannot avoid: an acks=all send-and-wait of one record
    and one Postgres commit, each timed alone."""
    from sqlalchemy import text

    envelope = Bench.envelopes(1, 1)[0]
    producer = make_producer(settings)
    await producer.start()
    sends: list[float] = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            await producer.send_and_wait(
                settings.topic_standard, value=envelope.value, key=envelope.contract_id.encode()
            )
            sends.append(time.perf_counter() - started)
    finally:
        await producer.stop()
    engine = make_engine(settings.database_url, 1)
    commits: list[float] = []
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TEMP TABLE bench_floor (n int)"))
            await conn.commit()
            for n in range(count):
                started = time.perf_counter()
                await conn.execute(text("INSERT INTO bench_floor VALUES (:n)"), {"n": n})
                await conn.commit()
                commits.append(time.perf_counter() - started)
    finally:
        await engine.dispose()
    return sends, commits


async def scenario_single(bench: Bench, scale: int) -> list[Row]:
    """Issue #11: a desk that sends records one by one. Closed loop with 1 and 16 clients."""
    sim_url, sim = await bench.simulator(0)
    settings = bench.settings(sim_url)
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    count = max(200, scale // 2)
    rates: dict[int, float] = {}
    try:
        for processes in (1, 2):
            url, token, intake = await bench.intake(settings, processes)
            try:
                await single_closed_loop(url, token, 4, 25)  # warm-up
                if processes == 1:
                    one = await single_closed_loop(url, token, 1, count)
                started = time.perf_counter()
                sixteen = await single_closed_loop(url, token, 16, max(25, count // 8))
                rates[processes] = len(sixteen) / (time.perf_counter() - started)
                if processes == 1:
                    p50_sixteen = percentile(sixteen, 0.5)
            finally:
                await bench.stop(intake)
        sends, commits = await floor_latencies(settings, count)
    finally:
        await bench.stop(sim)
    floor = percentile(sends, 0.5) + percentile(commits, 0.5)
    return [
        Row(
            "single record, one client, p50",
            "latency",
            percentile(one, 0.5) * 1000,
            floor * 1000,
            "ms",
            "<= 3 x (send-and-wait p50 + commit p50)",
        ),
        Row(
            "single records, 16 clients, one intake process",
            f"requests/s (p50 {p50_sixteen * 1000:.1f} ms)",
            rates[1],
            None,
            "req/s",
            ">= 500 req/s",
        ),
        Row(
            "single records, 16 clients, 2 intake processes vs 1",
            "requests/s",
            rates[2],
            rates[1],
            "req/s",
            "report (2 cores shared with everything else)",
        ),
    ]


async def read_latencies(url: str, token: str, path: str, count: int, rate: float) -> list[float]:
    """GETs of `path` at a fixed rate; seconds per request."""
    latencies: list[float] = []
    async with load_client(url, 30.0) as http:

        async def one() -> None:
            started = time.perf_counter()
            response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                raise RuntimeError(f"intake answered {response.status_code}")
            latencies.append(time.perf_counter() - started)

        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return latencies


FAIRNESS_ROUNDS = 8  # a multiple of its 4 conditions (`rotations`)
FAIRNESS_READS_PER_S = 50
# A load (`_paced`) starts one thing at most every PACE_S: the busy desk a batch, the control
# a burn of BURN_S (60 % of one core), about what the busy desk's batches cost the machine
# altogether (its worker process, Postgres, the broker).
PACE_S = 0.5
BURN_S = 0.3


def _busy_desk(
    url: str, token: str, bodies: int, ready: Any, go: Any, turn: Any, stop: Any, sent: Any
) -> None:
    """The fairness row's busy desk (a process of its own): builds its bodies (distinct
    records, so that every batch is accepted and published as a new one), says `ready`, then
    sends 5,000-record batches back to back, at most 2 a second, while `go` is set, until
    `stop`, counting them in `sent`. Each send holds `turn`: whoever takes it after clearing
    `go` knows no batch is in flight any more."""
    made = batch_bodies(bodies, 5000)
    ready.set()

    asyncio.run(
        _paced(go, turn, stop, sent, lambda i: post_batches(url, token, [made[i]], 1), len(made))
    )


def _burner(ready: Any, go: Any, turn: Any, stop: Any, sent: Any) -> None:
    """The fairness row's control (a process of its own): no request at all, only CPU — busy
    BURN_S in every PACE_S while `go` is set — at the lowest priority Linux has: a
    session of its own (so a scheduling group of its own under autogroup), that group and the
    process niced 19, and SCHED_IDLE (any task that wakes preempts it). Whatever it does to the
    other desk's reads is the machine's doing, not the intake's."""
    os.setsid()
    os.nice(19)
    with contextlib.suppress(OSError):  # no autogroup here
        Path("/proc/self/autogroup").write_text("19")
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    ready.set()

    async def burn(_: int) -> None:  # holds its own loop: burning is all it is for
        until = time.perf_counter() + BURN_S
        while time.perf_counter() < until:
            pass

    asyncio.run(_paced(go, turn, stop, sent, burn, 1))


def rotations(items: Sequence[T], rounds: int) -> list[list[T]]:
    """`items` in `rounds` orders, each turned one further than the one before: over a
    multiple of len(items) rounds, every item takes every place in a round equally often.
    With the fairness row's idle stretch first in every round (after the round before's last
    load), a second idle stretch further in read 0.82 / 0.95 / 0.84 x its p99 in 3 runs: where
    a condition comes in a round is not left to weigh on one of them."""
    return [[*items[r % len(items) :], *items[: r % len(items)]] for r in range(rounds)]


async def _paced(
    go: Any, turn: Any, stop: Any, sent: Any, one: Callable[[int], Awaitable[Any]], kinds: int
) -> None:
    """`one(i)` back to back, at most one every PACE_S, while `go` is set, until `stop`."""
    while not stop.is_set():
        if not go.is_set():
            await asyncio.sleep(0.01)
            continue
        started = time.monotonic()
        with turn:  # the reader holds it only for an instant
            if not go.is_set():
                continue
            await one(sent.value % kinds)
            sent.value += 1
        await asyncio.sleep(max(0.0, PACE_S - (time.monotonic() - started)))


class _Load:
    """A process the fairness row turns on and off (`_busy_desk`, `_burner`)."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.ready, self.go, self.stop = spawn.Event(), spawn.Event(), spawn.Event()
        self.turn, self.sent = spawn.Lock(), spawn.Value("i", 0)
        self.process = spawn.Process(
            target=target,
            args=(*args, self.ready, self.go, self.turn, self.stop, self.sent),
            daemon=True,
        )
        self.process.start()

    async def wait_ready(self, what: str) -> None:
        if not await asyncio.to_thread(self.ready.wait, 300):
            raise RuntimeError(f"{what} was not ready in 300 s")

    async def on(self, what: str) -> None:
        """Set it going; back once it has done one thing (the load is on)."""
        before = self.sent.value
        self.go.set()
        deadline = time.monotonic() + 60
        while self.sent.value <= before:
            if time.monotonic() > deadline or not self.process.is_alive():
                raise RuntimeError(f"{what} did nothing in 60 s")
            await asyncio.sleep(0.05)

    async def off(self) -> None:
        self.go.clear()
        await asyncio.to_thread(self.turn.acquire)  # what it was doing, if anything, is done
        self.turn.release()

    async def close(self) -> None:
        self.stop.set()
        self.go.set()
        await asyncio.to_thread(self.process.join, 30)
        if self.process.is_alive():
            self.process.kill()


async def scenario_fairness(bench: Bench, scale: int) -> list[Row]:
    """One desk sends 5,000-record batches back to back (at most 2 a second); another desk
    reads its batch status at FAIRNESS_READS_PER_S. Its p50/p99 against the same reads with
    the intake otherwise idle (issue #13: within 1.2x). The conditions take turns, in
    FAIRNESS_ROUNDS rounds, as in the latency scenario: one block each compared two stretches
    of a few seconds, and the machine's own noise between them.

    A third condition is the control: no second desk, only a process that burns CPU at the
    lowest priority there is (`_burner`). Measured on the 2-core machine of this repository,
    it raised the reads' p99 as much as the busy desk did, or more: there, the row's miss is
    the machine's, and the busy desk against the control says what the intake adds.

    A fourth is idle again: the two idle conditions against each other say how far the row's
    ratios move with nothing changed (its resolution)."""
    settings = bench.settings("http://127.0.0.1:9")
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    url, token, intake = await bench.intake(settings)
    other = mint_token(
        bench.root / "etrm-dev-es256.pem",
        issuer="bench",
        audience="bench",
        subject="other-trader",
        desk="other-desk",
        scopes=["settlements:write", "settlements:read"],
    )
    count = max(1000, scale)  # reads per condition
    per_turn = count // FAIRNESS_ROUNDS
    # About 2 batches a second while the loaded reads run (and the first one's acceptance).
    bodies = FAIRNESS_ROUNDS * (per_turn // (FAIRNESS_READS_PER_S // 2) + 4)
    # The busy desk is a client of its own, in its own process: in the reader's process its
    # 2.5 MB requests and their answers would hold the loop that times the other desk's reads.
    busy = _Load(_busy_desk, url, token, bodies)
    burner = _Load(_burner)
    reads: dict[str, list[float]] = {"idle": [], "loaded": [], "again": [], "control": []}
    try:
        [(run, body)] = batch_bodies(1, 1)
        async with load_client(url, 30.0) as http:
            answer = await http.post(
                "/v1/settlements/batches",
                content=body,
                headers={
                    "Authorization": f"Bearer {other}",
                    "Content-Type": "application/json",
                    "X-Settlement-Run-ID": run,
                    "Idempotency-Key": uuid.uuid4().hex,
                },
            )
        path = f"/v1/batches/{answer.json()['batch_id']}"
        # its bodies built before the idle reads, so that building them is not in either
        await busy.wait_ready("the busy desk's batches")
        await burner.wait_ready("the control")
        await read_latencies(url, other, path, 40, FAIRNESS_READS_PER_S)  # warm-up
        # "again": idle a second time; the two idle conditions against each other are the
        # row's own noise
        turns = [("idle", None), ("loaded", busy), ("again", None), ("control", burner)]
        for order in rotations(turns, FAIRNESS_ROUNDS):
            for name, load in order:
                if load is not None:
                    await load.on(name)
                reads[name] += await read_latencies(
                    url, other, path, per_turn, FAIRNESS_READS_PER_S
                )
                if load is not None:
                    await load.off()
    finally:
        await busy.close()
        await burner.close()
        await bench.stop(intake)
    batches_sent = busy.sent.value
    reused = f", bodies reused after {bodies}" if batches_sent > bodies else ""
    p99 = {name: percentile(values, 0.99) * 1000 for name, values in reads.items()}
    return [
        Row(
            "other desk's read p50, one desk sending 5,000-record batches",
            "latency",
            percentile(reads["loaded"], 0.5) * 1000,
            percentile(reads["idle"], 0.5) * 1000,
            "ms",
        ),
        *(
            Row(f"other desk's read p99, {what}", measured, p99[of], p99[against], "ms", target)
            for what, measured, of, against, target in (
                (
                    "one desk sending 5,000-record batches",
                    f"latency ({len(reads['loaded'])} reads each, "
                    f"{batches_sent} batches sent{reused})",
                    "loaded",
                    "idle",
                    "<= 1.2 x idle",
                ),
                (
                    "idle against idle (the row's own noise)",
                    "latency",
                    "again",
                    "idle",
                    "report: the row's resolution",
                ),
                (
                    "a lowest-priority CPU burner instead (control)",
                    f"latency (burning {BURN_S:g} s of every {PACE_S:g} s)",
                    "control",
                    "idle",
                    "report: the machine's own share",
                ),
                (
                    "the busy desk against the control",
                    "latency",
                    "loaded",
                    "control",
                    "report: what the intake adds",
                ),
            )
        ),
    ]


async def scenario_settlement_run(bench: Bench, scale: int) -> list[Row]:
    """Issue #11: a desk's settlement run — 20 x scale records in batches of 1,000 from 4
    clients, 2 workers at C = 64, 20 ms upstream — from the first POST to the last effect,
    against the ideal max(accept time, records x L / (C x workers))."""
    latency_s, concurrency, workers = 0.02, 64, 2
    sim_url, sim = await bench.simulator(int(latency_s * 1000))
    settings = bench.settings(sim_url, worker_concurrency=concurrency)
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    url, token, intake = await bench.intake(settings)
    records = 20 * scale
    bodies = batch_bodies(records // 1000, 1000)
    processes = bench.workers(settings, workers)
    try:
        await asyncio.sleep(5)  # both workers in the group before the run starts
        started = time.perf_counter()
        accept_s = await post_batches(url, token, bodies, clients=4)
        deadline = time.monotonic() + 1800
        while (await sim_stats(sim_url))["effects"] < records:
            if time.monotonic() > deadline:
                raise TimeoutError("the settlement run was not delivered in 30 minutes")
            await asyncio.sleep(0.2)
        total_s = time.perf_counter() - started
    finally:
        for process in processes:
            await bench.stop(process)
        await bench.stop(intake)
        await bench.stop(sim)
    ideal = max(accept_s, records * latency_s / (concurrency * workers))
    return [
        Row(
            f"settlement run of {records:,}: batches of 1,000, 4 clients, 2 workers, 20 ms",
            f"first POST -> last delivered (accepted in {accept_s:.1f} s)",
            total_s,
            ideal,
            "s",
            "<= 1.5 x ideal",
        )
    ]


Scenario = Callable[[Bench, int], Awaitable[list[Row]]]


async def scenario_worker(bench: Bench, scale: int) -> list[Row]:
    return [
        *await worker_throughput(bench, records=10 * scale, latency_ms=0, concurrency=64),
        *await worker_throughput(
            bench, records=3 * scale, latency_ms=50, concurrency=64, cpu=False
        ),
    ]


async def scenario_single_partition(bench: Bench, scale: int) -> list[Row]:
    concurrency = 64
    [row] = await worker_throughput(
        bench,
        records=3 * scale,
        latency_ms=50,
        concurrency=concurrency,
        partitions=1,
        label="one partition, many contracts",
        cpu=False,
    )
    ideal = concurrency / 0.05
    row.baseline, row.target = ideal, ">= 0.8 x C / 50 ms (baseline = C / 50 ms)"
    return [row]


SCENARIOS: dict[str, Scenario] = {
    "intake": scenario_intake,
    "latency": scenario_latency,
    "worker": scenario_worker,
    "single-partition": scenario_single_partition,
    "scale-out": scenario_scale_out,
    "memory": scenario_memory,
    "priority": scenario_priority,
    "single": scenario_single,
    "settlement-run": scenario_settlement_run,
    "fairness": scenario_fairness,
}


def render(rows: list[Row], title: str = "etrm-sync bench") -> Table:
    table = Table(title=title)
    for column in ("scenario", "measured", "value", "baseline", "ratio", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.scenario,
            row.measured,
            f"{row.value:,.1f} {row.unit}",
            "" if row.baseline is None else f"{row.baseline:,.1f} {row.unit}",
            "" if row.ratio is None else f"{row.ratio:.2f}",
            row.target,
        )
    return table


async def run_bench(names: list[str], scale: int, runs: int = 1) -> list[Row]:
    """Run the scenarios `runs` times; with several runs, print and keep the medians."""
    all_runs: list[list[Row]] = []
    failed: list[str] = []
    for number in range(1, runs + 1):
        root = Path(tempfile.mkdtemp(prefix="etrm-bench-"))
        bench = Bench(root)
        try:
            await bench.up()
            for name in names:
                console.print(f"[bold]run {number}/{runs}: {name}…")
                try:
                    bench.rows.extend(await SCENARIOS[name](bench, scale))
                except Exception as exc:  # one scenario's failure must not lose the others
                    failed.append(f"run {number}: {name}: {type(exc).__name__}: {exc}")
                    console.print(f"[red]scenario {name} failed[/]: {exc}")
                    for process in bench.processes:
                        if process.poll() is None:
                            process.kill()
                    continue
                console.print(render(bench.rows))
        finally:
            bench.down()
        all_runs.append(bench.rows)
    rows = median_rows(all_runs)
    if runs > 1:
        console.print(render(rows, title=f"etrm-sync bench: median of {runs} runs"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"bench-{stamp}.json"
    write_results(
        out,
        json.dumps(
            {
                "runs": runs,
                "failed": failed,
                "median": [{**row.__dict__, "ratio": row.ratio} for row in rows],
                "each_run": [
                    [{**row.__dict__, "ratio": row.ratio} for row in run] for run in all_runs
                ],
            },
            indent=2,
        ),
    )
    console.print(f"results: {out}")
    for failure in failed:
        console.print(f"[red]failed[/]: {failure}")
    return rows


def median_rows(runs: list[list[Row]]) -> list[Row]:
    if len(runs) == 1:
        return runs[0]
    rows = []
    names: list[str] = []
    for run in runs:  # by scenario name: a scenario that failed in one run is simply absent
        names.extend(r.scenario for r in run if r.scenario not in names)
    for name in names:
        same = [r for run in runs for r in run if r.scenario == name]
        first = same[0]
        baselines = [r.baseline for r in same if r.baseline is not None]
        ratios = [r.ratio for r in same if r.ratio is not None]
        rows.append(
            Row(
                first.scenario,
                first.measured,
                statistics.median(r.value for r in same),
                statistics.median(baselines) if baselines else None,
                first.unit,
                first.target,
                statistics.median(ratios) if ratios else None,
            )
        )
    return rows


def write_results(path: Path, content: str) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(content)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ops.bench")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--scale", type=int, default=1000, help="records per unit of work")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    args = parser.parse_args(argv)
    asyncio.run(run_bench(args.scenario or list(SCENARIOS), args.scale, args.runs))


if __name__ == "__main__":
    main()
