"""A big batch as the intake's worker process prepares it (ingest.preparing): what comes back
across the process boundary is the request whole — its records laid into the ledger's columns
with every payload sealed under the ledger's key, and into Kafka record batches with every
record signed (and sealed on encrypted lanes) under the batch id it is accepted as. Prepared
in parts by several worker processes and joined, it is the same request, or the parts say
that only the whole batch can answer."""

from __future__ import annotations

import gc
import pickle
from typing import Any

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ingest.auth import Principal
from ingest.preparing import Prepared, join_parts, prepare_batch_body, settle_parts
from ingest.problems import Problem
from ingest.publisher import Publication
from ledger.acceptance import RecordToAccept
from ledger.crypto import LaneSealer, PayloadCipher, open_lane_value
from runtime.cpu import Packed
from schemas import samples
from schemas.envelope import Envelope, header_map, verify_message

LANES = {"standard": "t.standard", "priority": "t.priority"}
PARTITIONS = {"t.standard": [0, 1, 2, 3], "t.priority": [0, 1]}
AT_REST = PayloadCipher([("e1", bytes(range(32)))])
ON_LANES = PayloadCipher([("e2", bytes(range(32, 64)))])
SIGNING = ("k1", b"lane-signing-secret")
WHO = Principal("trader-1", "power-east", frozenset({"settlements:write"}), None, None, None)


def _array(text: str) -> list[str]:
    """Postgres array text back to its elements (ledger.db.array_literal, no NULLs)."""
    return [v.strip('"').replace("\\\\", "\\") for v in text[1:-1].split(",")]


def _payloads(params: dict[str, Any]) -> list[bytes]:
    """The sealed payloads of the ledger's columns: one bytes, cut at their lengths."""
    payloads, cuts, start = params["payloads"], [], 0
    for length in map(int, _array(params["payload_lengths"])):
        cuts.append(payloads[start : start + length])
        start += length
    assert start == len(payloads)
    return cuts


def test_a_big_batch_comes_back_from_the_worker_process_laid_out_for_ledger_and_lanes() -> None:
    run = samples.run_id()
    raw = orjson.dumps({"records": samples.mixed_batch(run, 300, contracts=20, prefix="PREP")})
    prepared = prepare_batch_body(raw, WHO, run, LANES, _publication(ON_LANES), AT_REST)
    # as it crosses from the worker process (our own bytes, never a client's)
    back = pickle.loads(pickle.dumps(prepared, pickle.HIGHEST_PROTOCOL))  # noqa: S301
    assert back == prepared
    envelopes = back.envelopes
    assert [r.message_id for r in back.records] == [e.message_id for e in envelopes]

    assert back.columns is not None
    ids = _array(back.columns.params["ids"])
    assert ids == [e.message_id for e in envelopes]
    for envelope, sealed in zip(envelopes, _payloads(back.columns.params), strict=True):
        assert AT_REST.open("e1", sealed, envelope.message_id) == envelope.value

    assert back.kafka is not None
    by_id = {e.message_id: e for e in envelopes}
    published = []
    for topic, _partition, buffer, count in back.kafka:
        records = list(DefaultRecordBatch(buffer))
        assert len(records) == count
        for record in records:
            headers = header_map(record.headers)
            envelope = by_id[headers["message_id"]]
            assert topic == LANES[envelope.lane]
            assert record.key == envelope.contract_id.encode()
            assert (headers["batch_id"], headers["trace_id"]) == ("b_1", "tr-1")
            assert verify_message(record.value, headers, dict([SIGNING])) is None
            assert open_lane_value(record.value, headers, ON_LANES) == envelope.value
            published.append(headers["message_id"])
    assert sorted(published) == sorted(ids)


def _instances(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


@pytest.mark.parametrize("repeated", [False, True])
def test_the_serving_process_builds_no_record_object_for_a_batch_it_only_counts(
    repeated: bool,
) -> None:
    """Unpickling 5,000 envelopes and records took the pool's thread ~10 ms of the intake's
    GIL per batch: they come back packed, opened only when a record is read."""
    run = samples.run_id()
    records = samples.mixed_batch(run, 200, contracts=20, prefix="PACK")
    if repeated:  # the same record twice is one message: its own list of unique records
        records.append(records[0])
    raw = orjson.dumps({"records": records})
    prepared = prepare_batch_body(raw, WHO, run, LANES, _publication(None), AT_REST)
    blob = pickle.dumps(prepared, pickle.HIGHEST_PROTOCOL)
    del prepared
    gc.collect()
    envelopes, accepted = _instances(Envelope), _instances(RecordToAccept)
    back = pickle.loads(blob)  # noqa: S301 (our own bytes)
    assert back.columns is not None
    counted = (len(back.envelopes), len(back.records), len(back.columns.unique))
    assert counted == (len(records), len(records), 200)
    assert (_instances(Envelope), _instances(RecordToAccept)) == (envelopes, accepted)

    assert [r.index for r in back.records] == list(range(len(records)))
    assert [e.message_id for e in back.envelopes] == [r.message_id for r in back.records]
    unique = [r.message_id for r in back.columns.unique]
    assert unique == _array(back.columns.params["ids"])
    assert back.envelopes[-1].message_id == unique[0 if repeated else -1]
    assert _instances(Envelope) == envelopes + len(records)


def _publication(on_lanes: PayloadCipher | None) -> Publication:
    return Publication(
        LaneSealer(SIGNING, on_lanes),
        LANES,
        "power-east",
        "trader-1",
        "tr-1",
        "b_1",
        partitions=PARTITIONS,
    )


def _prepared(raw: bytes, run: str, part: tuple[int, int]) -> Prepared | Problem:
    """What a worker process sends back: the prepared records, or the problem it raised."""
    try:
        # lanes signed, not sealed: a record's bytes on its lane are then the same wherever built
        return prepare_batch_body(raw, PART_WHO, run, LANES, _publication(None), AT_REST, part)
    except Problem as problem:
        return problem


def _on_lanes(prepared: Prepared) -> dict[tuple[str, int], list[tuple[Any, ...]]]:
    """Each partition's records in order, as a consumer of the lane reads them."""
    assert prepared.kafka is not None
    lanes: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
    for topic, partition, buffer, _count in prepared.kafka:
        lanes.setdefault((topic, partition), []).extend(
            (r.key, r.value, tuple(r.headers)) for r in DefaultRecordBatch(buffer)
        )
    return lanes


def _ledger_view(prepared: Prepared) -> dict[str, Any]:
    """The ledger's columns, the sealed payloads opened (each sealing has its own nonce)."""
    assert prepared.columns is not None
    params = dict(prepared.columns.params)
    ids = _array(params["ids"])
    params["payloads"] = [
        AT_REST.open("e1", sealed, message_id)
        for message_id, sealed in zip(ids, _payloads(params), strict=True)
    ]
    return {"unique": prepared.columns.unique, **params}


# A token for the PART-* contracts only.
PART_WHO = Principal(
    "trader-1", "power-east", frozenset({"settlements:write"}), ("PART-*",), None, None
)

# What is done to a plain batch before it is split: the same record twice, a record of the
# same identity and revision with other content, a record that fails validation, a record of
# another settlement run, a record of a contract the token may not touch.
EDITS = st.lists(
    st.tuples(
        st.sampled_from(
            ["repeat", "repeat", "conflict", "conflict", "invalid", "other_run", "forbidden"]
        ),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
    ),
    max_size=2,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(2, 40), parts=st.integers(2, 4), edits=EDITS)
def test_a_batch_prepared_in_parts_is_the_batch_prepared_whole(
    count: int, parts: int, edits: list[tuple[str, int, int]]
) -> None:
    run = "RUN2026120300001"
    records = samples.mixed_batch(run, count, contracts=max(1, count // 3), prefix="PART")
    for edit, source, at in edits:
        record = dict(records[source % len(records)])
        if edit == "conflict":  # one identity and revision, two prices
            records.insert(at % len(records), samples.canonical(run, "PART-CONFLICT", price="1.25"))
            record = samples.canonical(run, "PART-CONFLICT", price="2.50")
        elif edit == "invalid":
            record["settlement_run_id"] = "not-a-run"
        elif edit == "other_run":
            record["settlement_run_id"] = "RUN2026120300002"
        elif edit == "forbidden":
            record["contract_id"] = "ELSEWHERE-00001"
        records.insert(at % (len(records) + 1), record)
    raw = orjson.dumps({"records": records})

    whole = _prepared(raw, run, (0, 1))
    pieces = [_prepared(raw, run, (i, parts)) for i in range(parts)]
    if any(isinstance(p, Problem) for p in pieces):
        assert isinstance(whole, Problem)  # a part refuses only a batch the whole refuses
    settled = settle_parts(pieces, run)
    if settled is None:
        event("prepared whole")  # records of one identity in two parts, or parts refused
        return
    if isinstance(settled, Problem):
        event("one part refused it")
        assert isinstance(whole, Problem)
        assert (settled.status, settled.code, settled.detail, settled.extra) == (
            whole.status,
            whole.code,
            whole.detail,
            whole.extra,
        )
        return
    event("joined")
    assert isinstance(whole, Prepared), whole.detail
    assert settled._replace(kafka=None, columns=None) == whole._replace(kafka=None, columns=None)
    assert _on_lanes(settled) == _on_lanes(whole)
    assert _ledger_view(settled) == _ledger_view(whole)


def test_parts_are_joined_without_opening_their_records() -> None:
    """Joining runs on the event loop: it reads none of the parts' records (unpickling and
    rebuilding them held the loop ~50 ms per 5,000-record batch), and the joined request
    counts them without opening them either, as a batch of new records only counts them."""
    run = "RUN2026120300001"
    raw = orjson.dumps({"records": samples.mixed_batch(run, 400, prefix="PART")})
    pieces = [_prepared(raw, run, (i, 3)) for i in range(3)]
    # as they cross from the worker processes
    parts = [pickle.loads(pickle.dumps(p, pickle.HIGHEST_PROTOCOL)) for p in pieces]  # noqa: S301
    joined = join_parts(parts, run)
    assert joined is not None
    assert joined.columns is not None
    assert len(joined.envelopes) == len(joined.records) == len(joined.columns.unique) == 400
    packed = [
        seq for part in parts for seq in (part.envelopes, part.records) if isinstance(seq, Packed)
    ]
    assert len(packed) == 6
    assert not any(seq.opened for seq in packed)
    whole = _prepared(raw, run, (0, 1))
    assert isinstance(whole, Prepared)
    assert joined.request_hash == whole.request_hash
    assert [e.message_id for e in joined.envelopes] == [e.message_id for e in whole.envelopes]


def test_parts_that_share_a_record_are_not_joined() -> None:
    """The same record in two parts would be two rows of one message in the ledger's columns:
    such a batch is prepared whole (where the repeat is taken once)."""
    run = "RUN2026120300001"
    records = samples.mixed_batch(run, 10, prefix="PART")
    raw = orjson.dumps({"records": [*records, records[0]]})
    pieces = [_prepared(raw, run, (i, 2)) for i in range(2)]
    assert all(isinstance(p, Prepared) for p in pieces)
    assert join_parts([p for p in pieces if isinstance(p, Prepared)], run) is None
    whole = _prepared(raw, run, (0, 1))
    assert isinstance(whole, Prepared)
    assert whole.columns is not None
    assert len(whole.columns.unique) == 10


def test_a_bad_record_in_a_later_part_is_named_by_its_index_in_the_batch() -> None:
    run = "RUN2026120300001"
    records = samples.mixed_batch(run, 30, prefix="PART")
    records[25] = {**records[25], "settlement_run_id": "not-a-run"}
    raw = orjson.dumps({"records": records})
    with pytest.raises(Problem) as refused:
        prepare_batch_body(raw, WHO, run, LANES, None, None, (1, 2))
    assert refused.value.status == 422
    assert refused.value.extra["errors"][0]["pointer"] == "/records/25/settlement_run_id"
