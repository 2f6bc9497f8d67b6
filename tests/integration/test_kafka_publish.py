"""The publisher's two paths on real Tansu: a big request goes out as record batches built off
the event loop, a small one record by record. Both must put a contract's records on the
partition a plain `producer.send` puts that contract on (the worker's per-contract order rests
on it, and replays and single records go the other way), in the order given, with their headers."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from runtime.cpu import HEAVY_RECORDS
from runtime.kafka import KafkaPublisher, OutgoingRecord, ensure_topics, make_producer
from tests.conftest import Infra, make_settings
from tests.support import read_topic

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("count", [HEAVY_RECORDS // 2, 1_500])
async def test_records_land_where_a_single_send_puts_their_contract_in_order(
    infra: Infra, count: int
) -> None:
    settings = make_settings(infra, database_url="postgresql+asyncpg://unused/none")
    topics = [settings.topic_standard, settings.topic_priority]
    await ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, 4)
    rng = random.Random(count)
    contracts = [f"C-{n:04d}" for n in range(40)]
    records: list[OutgoingRecord] = []
    for n in range(count):
        contract = rng.choice(contracts)
        records.append(
            (
                topics[n % 2],
                contract.encode(),
                f"{contract}:{n}:".encode() + b"x" * rng.randrange(200, 900),
                [("n", str(n).encode()), ("contract", contract.encode())],
            )
        )
    publisher = KafkaPublisher(settings)
    try:
        await publisher.send_all(records, what="test")
    finally:
        await publisher.stop()

    # Where a plain send puts each contract, per topic (a reference record on the reconciliation
    # topic would not do: a topic's partition count is part of the answer).
    producer = make_producer(settings)
    await producer.start()
    try:
        expected = {
            (topic, contract): (
                await producer.send_and_wait(
                    topic, key=contract.encode(), value=b"reference", headers=[("n", b"-1")]
                )
            ).partition
            for topic in topics
            for contract in contracts
        }
    finally:
        await producer.stop()

    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    total = 0
    for topic in topics:
        for record in await read_topic(
            settings.kafka_bootstrap_servers, topic, at_least=count // 2 + len(contracts)
        ):
            headers = dict(record.headers)
            if headers["n"] == b"-1":
                continue
            contract = headers["contract"].decode()
            n = int(headers["n"])
            assert record.key == contract.encode()
            assert record.value.startswith(f"{contract}:{n}:".encode())
            assert record.partition == expected[(topic, contract)], (topic, contract)
            seen[(topic, contract)].append(n)
            total += 1
    assert total == count
    for numbers in seen.values():
        assert numbers == sorted(numbers)
