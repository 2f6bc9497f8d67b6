"""A big batch body is parsed and validated in a worker process (runtime.cpu), off the
intake's event loop and its GIL. Played here on the real stack: the records of a batch
prepared in a worker process are delivered once each; a bad record deep in it comes back as
the same 422 (record index and field) as on the loop; a worker process killed under the intake
does not cost a request (the work is done in a thread instead); a batch prepared in parts by
idle worker processes is the batch, delivered once each and in order per contract, and is
refused in the whole batch's words; and a
worker process does not outlive an intake killed outright."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest

from ingest.routes import settlements
from runtime import cpu
from schemas import samples
from schemas.envelope import header_map
from tests.conftest import PipelineFactory, submit_batch
from tests.support import assert_contract_order, assert_effects_once, read_topic


async def _processes_up(count: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := cpu.process_ids()) < count:
        assert time.monotonic() < deadline, f"worker processes not up: {pids}"
        await asyncio.sleep(0.1)
    return pids


def _with_bad_run_id(records: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [
        {**r, "settlement_run_id": "not-a-run"} if i == index else r for i, r in enumerate(records)
    ]


async def test_a_big_batch_is_prepared_in_a_worker_process(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe = await pipeline_factory(intake_cpu_processes=1)
    client = pipe.client()
    run = samples.run_id()
    records = samples.mixed_batch(run, 600, contracts=30, prefix="BIG")

    refused = await submit_batch(client, run, _with_bad_run_id(records, 451))
    assert refused.status_code == 422, refused.text
    first = refused.json()["errors"][0]
    assert (first["index"], first["pointer"]) == (451, "/records/451/settlement_run_id")
    [child] = await _processes_up(1)
    assert child != os.getpid()

    accepted = await submit_batch(client, run, records)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["accepted"] == 600
    assert cpu.process_ids() == [child]  # prepared there, not in a thread
    final = await pipe.wait_final(client, accepted.json()["batch_id"], timeout=120)
    assert final["counts"] == {"delivered": 600}

    # The worker process dies (killed, out of memory): the next big batch is still accepted.
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while child in cpu.process_ids():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    more = samples.mixed_batch(run, 400, contracts=20, prefix="BIG2")
    again = await submit_batch(client, run, more)
    assert again.status_code == 202, again.text
    final = await pipe.wait_final(client, again.json()["batch_id"], timeout=120)
    assert final["counts"] == {"delivered": 400}

    posts = Counter(e.idempotency_key for e in pipe.sim.effects)
    assert len(posts) == 1000
    assert set(posts.values()) == {1}
    assert set(pipe.sim.posts_by_key.values()) == {1}


async def test_a_big_batch_on_sealed_lanes_is_signed_and_sealed_in_the_worker_process(
    pipeline_factory: PipelineFactory,
) -> None:
    """The worker process lays the records into Kafka record batches, signed and (with lane
    encryption) sealed under the keys it was handed: every copy opens and verifies at the
    workers, so each record reaches the engine once; a reader of the lane sees no contract."""
    pipe = await pipeline_factory(intake_cpu_processes=1, kafka_encrypt_payloads=True)
    client = pipe.client()
    run = samples.run_id()
    accepted = await submit_batch(client, run, samples.mixed_batch(run, 500, prefix="SEAL"))
    assert accepted.status_code == 202, accepted.text
    assert len(await _processes_up(1)) == 1
    batch_id = accepted.json()["batch_id"]
    final = await pipe.wait_final(client, batch_id, timeout=120)
    assert final["counts"] == {"delivered": 500}
    assert Counter(pipe.sim.posts_by_key.values()) == Counter({1: 500})
    lanes = [
        r
        for topic in (pipe.settings.topic_standard, pipe.settings.topic_priority)
        for r in await read_topic(pipe.settings.kafka_bootstrap_servers, topic, timeout=2)
    ]
    ours = [r for r in lanes if header_map(r.headers).get("batch_id") == batch_id]
    assert len(ours) == 500
    for record in ours:
        assert header_map(record.headers)["encryption"].endswith(",alg=A256GCM")
        assert b"SEAL-" not in record.value


async def test_a_big_batch_is_prepared_in_parts_by_the_idle_worker_processes(
    pipeline_factory: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = await pipeline_factory(intake_cpu_processes=2)
    client = pipe.client()
    parts: list[tuple[int, int]] = []  # the part each piece of preparing work was given
    handed = cpu.in_process

    async def watched(work: Any, *args: Any) -> Any:
        parts.append(args[6] if len(args) > 6 else (0, 1))
        return await handed(work, *args)

    monkeypatch.setattr(settlements, "in_process", watched)
    run = samples.run_id()
    records = samples.mixed_batch(run, 1000, contracts=40, prefix="HALF")

    # A bad record in the second half: that part alone refuses the batch, in the whole batch's
    # words (one error, named by its index in the batch), without preparing it again.
    refused = await submit_batch(client, run, _with_bad_run_id(records, 901))
    assert refused.status_code == 422, refused.text
    assert [e["pointer"] for e in refused.json()["errors"]] == ["/records/901/settlement_run_id"]
    assert parts == [(0, 2), (1, 2)]
    # Bad records in both halves: the whole batch, prepared in one piece, lists them all.
    parts.clear()
    refused = await submit_batch(client, run, _with_bad_run_id(_with_bad_run_id(records, 901), 17))
    assert refused.status_code == 422, refused.text
    assert [e["index"] for e in refused.json()["errors"]] == [17, 901]
    assert parts == [(0, 2), (1, 2), (0, 1)]
    assert len(await _processes_up(2)) == 2

    parts.clear()
    accepted = await submit_batch(client, run, records)
    assert accepted.status_code == 202, accepted.text
    assert parts == [(0, 2), (1, 2)]
    answer = accepted.json()
    assert [m["index"] for m in answer["messages"]] == list(range(1000))
    ids = [m["message_id"] for m in answer["messages"]]
    final = await pipe.wait_final(client, answer["batch_id"], timeout=180)
    assert final["counts"] == {"delivered": 1000}
    assert_effects_once(pipe.sim, ids)
    assert_contract_order(pipe.sim, {m: i for i, m in enumerate(ids)})

    # While another desk is being served, a big batch takes one worker process, leaving the
    # other core to that desk's requests.
    elsewhere = pipe.client(desk="power-west")
    assert (await elsewhere.get("/v1/batches/none-such")).status_code == 404
    parts.clear()
    shared = await submit_batch(client, run, samples.mixed_batch(run, 1000, prefix="ONE"))
    assert shared.status_code == 202, shared.text
    assert parts == [(0, 1)]
    await pipe.wait_final(client, shared.json()["batch_id"], timeout=180)
    await asyncio.sleep(settlements.OTHER_DESKS_WITHIN_S)

    # The same record in both halves: joined, the halves would be two rows of one message, so
    # the batch is prepared whole, where the repeat is taken once.
    parts.clear()
    more = samples.mixed_batch(run, 1000, contracts=40, prefix="HALF2")
    again = await submit_batch(client, run, [*more, more[0]])
    assert again.status_code == 202, again.text
    assert parts == [(0, 2), (1, 2), (0, 1)]
    repeated = again.json()["messages"]
    assert repeated[1000]["message_id"] == repeated[0]["message_id"]
    final = await pipe.wait_final(client, again.json()["batch_id"], timeout=180)
    assert set(final["counts"]) == {"delivered"}
    assert_effects_once(pipe.sim, [m["message_id"] for m in repeated])
    assert set(pipe.sim.posts_by_key.values()) == {1}


def test_a_worker_process_does_not_outlive_its_intake(tmp_path: object) -> None:
    """SIGKILL leaves the serving process no chance to shut its pool: the worker processes
    notice their parent is gone and leave."""
    script = textwrap.dedent(
        """
        import sys, time
        from runtime import cpu
        cpu.use_processes(1)
        cpu.warm_processes()
        deadline = time.monotonic() + 30
        while not cpu.process_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(cpu.process_ids()[0], flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd(), text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the worker process outlived its intake"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
