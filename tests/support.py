"""Helpers the integration and fault tests share: polling instead of sleeping, reading a topic,
injecting raw records, and counting effects honestly (per key, at the simulator)."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ops.dev.simulator import SimState
from schemas.envelope import envelope_for, sign_message, validate_record

OPS = "ops:read ops:replay ops:holds"


Condition = Callable[[], Awaitable[bool] | bool]


def message_id(desk: str, raw: dict[str, Any]) -> str:
    """The message id the intake gives this raw record of this desk."""
    record = validate_record(raw, 0)
    assert not isinstance(record, list), record
    return envelope_for(desk, record).message_id


async def holds(predicate: Condition) -> bool:
    result = predicate()
    return bool(await result) if inspect.isawaitable(result) else bool(result)


async def wait_for(predicate: Condition, timeout: float = 30.0, every: float = 0.2) -> None:
    """Poll until the condition holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await holds(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def never(predicate: Condition, seconds: float, every: float = 0.1) -> None:
    """A negative assertion that would catch a late event: poll for the whole window and fail
    the moment the condition becomes true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not await holds(predicate), "it happened"
        await asyncio.sleep(every)


async def read_topic(
    bootstrap: str, topic: str, *, at_least: int = 0, timeout: float = 15.0
) -> list[Any]:
    """Every record on a topic so far (waiting up to `timeout` for `at_least` of them)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                found.extend(records)
            if not batch and len(found) >= at_least:
                break
    finally:
        await consumer.stop()
    return found


async def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()


def signed_headers(
    value: bytes, headers: dict[str, str], signing_keys: list[tuple[str, bytes]]
) -> list[tuple[str, bytes | None]]:
    kid, secret = signing_keys[0]
    signed = {**headers, "signature": sign_message(value, headers, kid, secret)}
    return [(k, v.encode()) for k, v in signed.items()]


def headers_of(record: Any) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers}


def assert_effects_once(sim: SimState, message_ids: Sequence[str]) -> None:
    """Each accepted record took effect exactly once at the upstream (counted per key)."""
    effects = Counter(e.idempotency_key for e in sim.effects)
    twice = {k: n for k, n in effects.items() if n > 1}
    assert not twice, f"took effect twice: {twice}"
    missing = [m for m in message_ids if effects[m] == 0]
    assert not missing, f"never took effect: {missing[:5]}"


def assert_contract_order(sim: SimState, order: dict[str, int]) -> None:
    """Effects of one contract came in submission order (`order`: message id -> position)."""
    seen: dict[str, list[int]] = {}
    for effect in sim.effects:
        if effect.idempotency_key in order:
            seen.setdefault(effect.contract_id, []).append(order[effect.idempotency_key])
    for contract, positions in seen.items():
        assert positions == sorted(positions), f"{contract} took effect out of order: {positions}"


async def states(client: httpx.AsyncClient, batch_id: str) -> dict[str, str]:
    body = (await client.get(f"/v1/batches/{batch_id}")).json()
    return {m["message_id"]: m["state"] for m in body["messages"]}


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str


async def run_cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> CliRun:
    """`etrm-sync ARGS` as an operator types it, in a subprocess with the pipeline's settings."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return CliRun(process.returncode, stdout.decode(), stderr.decode())
