"""Record batches built away from the producer (runtime.kafka.build_batches: in a worker
process for a big request): each record where the producer's own partitioner puts it, in
order, and each batch stamped for an idempotent producer exactly as aiokafka stamps its own."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kafka import MAX_BATCH_BYTES, NO_COMPRESSION, OutgoingRecord, _Built, build_batches

PARTITIONS = {"lane.a": [0, 1, 2, 3], "lane.b": [0, 1]}


def _records(count: int, size: int = 40) -> list[OutgoingRecord]:
    return [
        (
            "lane.a" if i % 4 else "lane.b",
            f"CONTRACT-{i % 7}".encode(),
            bytes([i % 256]) * size,
            [("message_id", f"m{i}".encode()), ("desk", b"power-east")],
        )
        for i in range(count)
    ]


def _read(buffer: bytes) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    return [(r.key, r.value, list(r.headers)) for r in DefaultRecordBatch(buffer)]


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 300), size=st.sampled_from([10, 2_000, 40_000]))
def test_each_record_goes_where_the_producer_would_put_it_in_order(count: int, size: int) -> None:
    records = _records(count, size)
    built = build_batches(records, PARTITIONS)
    choose = DefaultPartitioner()
    expected: dict[tuple[str, int], list[object]] = {}
    for topic, key, value, headers in records:
        tp = (topic, choose(key, PARTITIONS[topic], PARTITIONS[topic]))
        expected.setdefault(tp, []).append((key, value, list(headers)))
    found: dict[tuple[str, int], list[object]] = {}
    for topic, partition, buffer, count_in in built:
        assert len(buffer) <= MAX_BATCH_BYTES or count_in == 1
        read = _read(buffer)
        assert len(read) == count_in
        found.setdefault((topic, partition), []).extend(read)
    assert found == expected


def test_a_batch_built_elsewhere_is_stamped_for_an_idempotent_producer_as_aiokafka_would() -> None:
    for _topic, _partition, buffer, count in build_batches(_records(60), PARTITIONS):
        ours = _Built(buffer, count)
        ours._set_producer_state(4711, 3, 120)
        theirs = BatchBuilder(MAX_BATCH_BYTES, NO_COMPRESSION)
        theirs._set_producer_state(4711, 3, 120)
        for record in DefaultRecordBatch(buffer):
            theirs.append(
                timestamp=record.timestamp,
                key=record.key,
                value=record.value,
                headers=record.headers,
            )
        assert bytes(ours._build()) == bytes(theirs._build())
        stamped = DefaultRecordBatch(bytes(ours._build()))
        assert stamped.validate_crc()
        assert (stamped.producer_id, stamped.producer_epoch, stamped.base_sequence) == (
            4711,
            3,
            120,
        )
        assert ours.append(timestamp=None, key=b"k", value=b"v") is None  # closed to sends
