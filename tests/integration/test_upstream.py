"""Issue #8 on the real broker, database and simulator: an outage three times the retry budget
dead-letters nothing, two workers share one breaker and send one probe at a time, a failing
probe opens it again and a good one closes it, nothing is sent inside a declared maintenance
window, and a 503 announcing maintenance holds everything until then without charging records.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ledger.db import make_engine
from schemas import samples
from schemas.records import iso_z
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import assert_contract_order, assert_effects_once, never, run_cli, wait_for

pytestmark = pytest.mark.integration

BUDGET_S = 3.0
PROBE_S = 1.0
BREAKER = {
    "breaker_failures": 5,
    "breaker_window_s": 30.0,
    "breaker_probe_interval_s": PROBE_S,
    "upstream_retry_budget_s": BUDGET_S,
    "upstream_max_attempts": 4,
    "upstream_announced_outage_s": 5.0,
}


@pytest.fixture
async def guarded(pipeline_factory: PipelineFactory) -> Pipeline:
    pipe: Pipeline = await pipeline_factory(**BREAKER)
    return pipe


async def upstream(pipe: Pipeline) -> dict[str, Any]:
    answer = await pipe.operator().get("/v1/upstream")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def dead_letter_count(pipe: Pipeline) -> int:
    items = (await pipe.operator().get("/v1/reconciliation", params={"limit": 1000})).json()
    return len(items["items"])


async def audit_actions(pipe: Pipeline, prefix: str) -> list[tuple[str, str]]:
    engine = make_engine(pipe.settings.database_url, 1)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT action, detail FROM audit_log WHERE action LIKE :p ORDER BY id"),
                {"p": f"{prefix}%"},
            )
            return [(r.action, r.detail or "") for r in rows]
    finally:
        await engine.dispose()


@pytest.fixture
async def second_worker(guarded: Pipeline) -> AsyncIterator[None]:
    """Another worker of the same group, in a process of its own."""
    process = guarded.spawn_worker()
    yield
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, 20)
    except Exception:
        process.kill()


def submissions(run: str, contracts: int, per_contract: int) -> list[dict[str, Any]]:
    return [
        samples.canonical(run, f"OUT-{c:04d}", revision=1, hour=h, position=f"{10 + h}.000")
        if c % 3 == 0
        else samples.otc_confirmation(run, f"OUT-{c:04d}-{h:02d}", volume=str(100 + h))
        for c in range(contracts)
        for h in range(per_contract)
    ]


async def test_an_outage_three_times_the_budget_ends_with_every_record_delivered_once(
    guarded: Pipeline, second_worker: None
) -> None:
    pipe = guarded
    desk = pipe.client()
    pipe.sim.config.outage = True
    run = samples.run_id()
    batch = await submit_batch(desk, run, submissions(run, 12, 5))
    assert batch.status_code == 202, batch.text
    ids = [m["message_id"] for m in batch.json()["messages"]]

    async def opened() -> bool:
        return bool((await upstream(pipe))["circuit"] != "closed")

    await wait_for(opened, timeout=20)
    message = (await desk.get(f"/v1/settlements/{ids[0]}")).json()
    assert message["waiting"]["reason"] == "circuit_open"
    await asyncio.sleep(1.0)  # answers to POSTs sent before it opened come back
    posts_before = pipe.sim.posts
    started = time.monotonic()

    async def any_dead_letter() -> bool:
        return await dead_letter_count(pipe) > 0

    await never(any_dead_letter, 3 * BUDGET_S, every=0.5)
    elapsed = time.monotonic() - started
    probes = pipe.sim.posts - posts_before
    # Two workers, one breaker: one probe per interval for the whole group.
    assert probes <= elapsed / PROBE_S + 2, (probes, elapsed)
    assert await audit_actions(pipe, "upstream.circuit_half_open")

    pipe.sim.config.outage = False
    final = await pipe.wait_final(desk, batch.json()["batch_id"], timeout=90)
    assert final["counts"] == {"delivered": len(ids)}
    assert await dead_letter_count(pipe) == 0
    assert_effects_once(pipe.sim, ids)
    assert_contract_order(pipe.sim, {m: i for i, m in enumerate(ids)})
    status = await upstream(pipe)
    assert status["circuit"] == "closed"
    assert status["waiting"] is None


async def test_a_failing_probe_opens_the_breaker_again_and_a_good_one_closes_it(
    guarded: Pipeline,
) -> None:
    pipe = guarded
    desk = pipe.client()
    pipe.sim.config.outage = True
    run = samples.run_id()
    batch = await submit_batch(desk, run, submissions(run, 4, 2))

    async def probed_twice() -> bool:
        actions = [a for a, _ in await audit_actions(pipe, "upstream.circuit_")]
        # closed -> open, then at least twice: a probe (half_open) that failed (open)
        return actions.count("upstream.circuit_half_open") >= 2 and actions[-1] in (
            "upstream.circuit_open",
            "upstream.circuit_half_open",
        )

    await wait_for(probed_twice, timeout=30)
    pipe.sim.config.outage = False

    async def closed() -> bool:
        return bool((await upstream(pipe))["circuit"] == "closed")

    await wait_for(closed, timeout=20)
    actions = [a for a, _ in await audit_actions(pipe, "upstream.circuit_")]
    assert actions[0] == "upstream.circuit_open"
    assert actions[-1] == "upstream.circuit_closed"
    assert "upstream.circuit_half_open" in actions
    final = await pipe.wait_final(desk, batch.json()["batch_id"], timeout=60)
    assert set(final["counts"]) == {"delivered"}


async def test_nothing_is_sent_inside_a_declared_maintenance_window(guarded: Pipeline) -> None:
    pipe = guarded
    desk = pipe.client()
    admin = pipe.client(desk="ops", scopes="ops:read ops:upstream", subject="op-maint")
    starts = datetime.now(UTC) + timedelta(seconds=2)
    ends = starts + timedelta(seconds=4)
    declared = await admin.post(
        "/v1/upstream/maintenance",
        json={"from": iso_z(starts), "until": iso_z(ends), "reason": "ETRM patch night"},
    )
    assert declared.status_code == 201, declared.text
    window = declared.json()
    assert (window["created_by"], window["reason"]) == ("op-maint", "ETRM patch night")
    assert [w["id"] for w in (await upstream(pipe))["maintenance"]] == [window["id"]]

    await asyncio.sleep(max(0.0, (starts - datetime.now(UTC)).total_seconds()) + 0.2)
    run = samples.run_id()
    batch = await submit_batch(desk, run, submissions(run, 6, 2))
    assert batch.status_code == 202  # the intake keeps accepting during maintenance
    status = (await desk.get(batch.json()["status_url"])).json()
    assert status["waiting"] == {"reason": "maintenance", "until": iso_z(ends)}
    final = await pipe.wait_final(desk, batch.json()["batch_id"], timeout=60)
    assert set(final["counts"]) == {"delivered"}
    inside = [t for t in pipe.sim.arrivals if starts.timestamp() <= t < ends.timestamp()]
    assert inside == []
    assert await audit_actions(pipe, "upstream.maintenance_added")

    # A window cancelled before it starts holds nothing back.
    later = datetime.now(UTC) + timedelta(hours=1)
    second = await admin.post(
        "/v1/upstream/maintenance",
        json={"from": iso_z(later), "until": iso_z(later + timedelta(hours=1)), "reason": "x"},
    )
    cancelled = await admin.delete(f"/v1/upstream/maintenance/{second.json()['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["cancelled_by"] == "op-maint"
    again = await admin.delete(f"/v1/upstream/maintenance/{second.json()['id']}")
    assert again.status_code == 404
    assert (await upstream(pipe))["maintenance"] == []
    bad = await admin.post(
        "/v1/upstream/maintenance",
        json={"from": iso_z(later), "until": iso_z(later - timedelta(hours=1)), "reason": "x"},
    )
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid_window")


async def test_a_503_announcing_maintenance_holds_everything_until_then(
    guarded: Pipeline,
) -> None:
    pipe = guarded
    desk = pipe.client()
    pipe.sim.config.outage = True
    pipe.sim.config.retry_after_s = 6
    run = samples.run_id()
    batch = await submit_batch(desk, run, submissions(run, 6, 2))
    ids = [m["message_id"] for m in batch.json()["messages"]]

    async def announced() -> bool:
        return bool((await upstream(pipe)).get("reason") == "announced")

    await wait_for(announced, timeout=20)
    status = await upstream(pipe)
    assert status["waiting"]["reason"] == "maintenance"
    until = datetime.fromisoformat(status["next_probe_at"].replace("Z", "+00:00"))
    assert 4 < (until - datetime.now(UTC)).total_seconds() <= 6.5
    await asyncio.sleep(1.0)  # answers already on their way
    posts = pipe.sim.posts
    pipe.sim.config.outage = False

    async def sent_early() -> bool:
        return pipe.sim.posts > posts and datetime.now(UTC) < until - timedelta(seconds=0.5)

    await never(sent_early, max(0.0, (until - datetime.now(UTC)).total_seconds() - 0.6))
    final = await pipe.wait_final(desk, batch.json()["batch_id"], timeout=60)
    assert set(final["counts"]) == {"delivered"}
    assert await dead_letter_count(pipe) == 0
    assert_effects_once(pipe.sim, ids)
    async with httpx.AsyncClient(base_url=pipe.intake.url) as plain:
        assert (await plain.get("/v1/upstream")).status_code == 401


async def cli(pipe: Pipeline, *args: str) -> Any:
    done = await run_cli(pipe.env, "upstream", *args, "--json")
    assert done.code == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


async def test_the_command_line_declares_shows_and_cancels_windows(guarded: Pipeline) -> None:
    pipe = guarded
    window = await cli(
        pipe,
        "maintenance",
        "add",
        "--from",
        "2030-01-05T02:00:00Z",
        "--until",
        "2030-01-05T04:00:00+00:00",
        "--reason",
        "quarterly ETRM upgrade",
    )
    assert (window["from"], window["until"]) == (
        "2030-01-05T02:00:00.000000Z",
        "2030-01-05T04:00:00.000000Z",
    )
    assert window["created_by"] == f"db:{getpass.getuser()}"
    status = await cli(pipe, "status")
    assert status["circuit"] == "closed"
    assert [w["id"] for w in status["maintenance"]] == [window["id"]]
    assert (await upstream(pipe))["maintenance"][0]["reason"] == "quarterly ETRM upgrade"
    removed = await cli(pipe, "maintenance", "remove", window["id"])
    assert removed["cancelled_by"] == f"db:{getpass.getuser()}"
    assert (await cli(pipe, "status"))["maintenance"] == []
    audited = await audit_actions(pipe, "upstream.maintenance_")
    assert [a for a, _ in audited] == [
        "upstream.maintenance_added",
        "upstream.maintenance_cancelled",
    ]
