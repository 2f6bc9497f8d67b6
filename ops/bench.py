"""`etrm-sync bench`: every stage measured against a baseline run in the same process, on the
same broker, database and simulator, so a noisy shared machine cancels out in the ratio.

Starts its own Tansu and embedded PostgreSQL (or uses ETRM_DATABASE_URL), runs the scenarios,
prints a table and writes JSON to bench-results/. Also runnable as `python -m ops.bench`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from ingest.publisher import SettlementPublisher
from ledger.db import migrate
from ops import samples
from ops.stack import Broker, Database, free_port
from runtime.kafka import all_topics, ensure_topics
from runtime.settings import Settings, load_settings, settings_env
from schemas.envelope import Envelope, envelope_for, validate_record

RESULTS = Path("bench-results")
console = Console()


@dataclass
class Row:
    scenario: str
    measured: str
    value: float
    baseline: float | None
    unit: str
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        assert self.baseline is not None
        return self.value / self.baseline


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
        self.broker = Broker(free_port(), self.root / "tansu.log").start()
        if not self.database_url:
            self.database = Database(self.root / "pg", free_port()).start()
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

    def settings(self, sim_url: str, **overrides: Any) -> Settings:
        assert self.broker is not None
        tag = uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": self.broker.bootstrap,
            "kafka_enable_idempotence": False,
            "kafka_group_id": f"bench-{tag}",
            "kafka_session_timeout_ms": 2000,
            "kafka_heartbeat_interval_ms": 500,
            "topic_priority": f"b{tag}.priority",
            "topic_standard": f"b{tag}.standard",
            "topic_reconciliation": f"b{tag}.reconciliation",
            "database_url": self.database_url,
            "worker_metrics_port": free_port(),
            "upstream_url": sim_url,
            "upstream_token_url": f"{sim_url}/oauth/token",
            "upstream_client_id": "bench",
            "upstream_client_secret": self.client_secret,
            "upstream_signing_secret": self.signing_secret,
            "message_signing_keys": f"b1={secrets.token_urlsafe(24)}",
            "encryption_keys": f"e1={base64.b64encode(secrets.token_bytes(32)).decode()}",
        }
        values.update(overrides)
        return load_settings(**values)

    def spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=(self.root / f"{args[0]}.log").open("ab"),
        )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

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

    # -- workload ------------------------------------------------------------------------------

    @staticmethod
    def envelopes(count: int, contracts: int) -> list[Envelope]:
        run = samples.run_id()
        result = []
        for raw in samples.mixed_batch(run, count, contracts=contracts, prefix="BENCH"):
            record = validate_record(raw, 0)
            assert not isinstance(record, list), record
            result.append(envelope_for("bench-desk", record))
        return result

    @staticmethod
    async def preload(settings: Settings, envelopes: list[Envelope], partitions: int) -> None:
        await ensure_topics(settings.kafka_bootstrap_servers, all_topics(settings), partitions)
        publisher = SettlementPublisher(
            settings.model_copy(update={"kafka_publish_timeout_s": 120.0})
        )
        try:
            for start in range(0, len(envelopes), 5000):
                await publisher.publish(
                    envelopes[start : start + 5000],
                    desk="bench-desk",
                    trader="bench",
                    trace_id=uuid.uuid4().hex,
                    batch_id="bench",
                )
        finally:
            await publisher.stop()


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def sim_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        stats: dict[str, Any] = (await http.get(f"{url}/_sim/stats")).json()
        return stats


async def reset_sim(url: str) -> None:
    async with httpx.AsyncClient(timeout=10.0) as http:
        await http.post(f"{url}/_sim/reset")


async def effects_rate(url: str, expected: int, timeout: float) -> float:
    """Records/s between the first and the last effect the simulator saw."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await sim_stats(url)
        if stats["effects"] >= expected:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {stats['effects']} of {expected} effects")
        await asyncio.sleep(0.2)
    span = stats["last_effect_at"] - stats["first_effect_at"]
    return (expected - 1) / span if span > 0 else float("inf")


async def baseline_consumer(settings: Settings, expected: int, concurrency: int) -> None:
    """The floor to compare with: getmany + concurrent posts; no ledger, no signing, no
    ordering, no retries."""
    consumer = AIOKafkaConsumer(
        *settings.topics,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"{settings.kafka_group_id}-baseline",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as http:
        assert settings.upstream_token_url
        assert settings.upstream_url
        token = (
            await http.post(
                settings.upstream_token_url,
                data={"grant_type": "client_credentials"},
                auth=("bench", settings.secret("upstream_client_secret")),
            )
        ).json()["access_token"]
        url = settings.upstream_url + "/api/v1/settlements/sync"
        slots = asyncio.Semaphore(concurrency)

        async def post(value: bytes, key: str) -> None:
            async with slots:
                await http.post(
                    url,
                    content=value,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Idempotency-Key": key,
                        "Content-Type": "application/json",
                    },
                )

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
) -> Row:
    sim_url, sim = await bench.simulator(latency_ms)
    try:
        settings = bench.settings(sim_url, worker_concurrency=concurrency)
        await bench.preload(settings, bench.envelopes(records, contracts), partitions)
        baseline_task = asyncio.create_task(baseline_consumer(settings, records, concurrency))
        baseline = await effects_rate(sim_url, records, timeout=600)
        await baseline_task
        await reset_sim(sim_url)
        worker = bench.spawn(["worker"], settings_env(settings))
        try:
            measured = await effects_rate(sim_url, records, timeout=600)
        finally:
            bench.stop(worker)
    finally:
        bench.stop(sim)
    return Row(
        f"{label}, {latency_ms:.0f} ms upstream, C={concurrency}",
        "records/s delivered",
        measured,
        baseline,
        "rec/s",
        ">= 0.7 x baseline",
    )


Scenario = Callable[[Bench, int], Awaitable[list[Row]]]


async def scenario_worker(bench: Bench, scale: int) -> list[Row]:
    return [
        await worker_throughput(bench, records=10 * scale, latency_ms=0, concurrency=64),
        await worker_throughput(bench, records=3 * scale, latency_ms=50, concurrency=64),
    ]


async def scenario_single_partition(bench: Bench, scale: int) -> list[Row]:
    concurrency = 64
    row = await worker_throughput(
        bench,
        records=3 * scale,
        latency_ms=50,
        concurrency=concurrency,
        partitions=1,
        label="one partition, many contracts",
    )
    ideal = concurrency / 0.05
    row.baseline, row.target = ideal, ">= 0.8 x C / 50 ms (baseline = C / 50 ms)"
    return [row]


SCENARIOS: dict[str, Scenario] = {
    "worker": scenario_worker,
    "single-partition": scenario_single_partition,
}


def render(rows: list[Row]) -> Table:
    table = Table(title="etrm-sync bench")
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


async def run_bench(names: list[str], scale: int) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="etrm-bench-"))
    bench = Bench(root)
    try:
        await bench.up()
        for name in names:
            console.print(f"[bold]running {name}…")
            bench.rows.extend(await SCENARIOS[name](bench, scale))
            console.print(render(bench.rows))
    finally:
        bench.down()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"bench-{stamp}.json"
    write_results(
        out, json.dumps([{**row.__dict__, "ratio": row.ratio} for row in bench.rows], indent=2)
    )
    console.print(f"results: {out}")
    return bench.rows


def write_results(path: Path, content: str) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(content)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ops.bench")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--scale", type=int, default=1000, help="records per unit of work")
    args = parser.parse_args(argv)
    asyncio.run(run_bench(args.scenario or list(SCENARIOS), args.scale))


if __name__ == "__main__":
    main()
