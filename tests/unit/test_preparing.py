"""A big batch as the intake's worker process prepares it (ingest.preparing): what comes back
across the process boundary is the request whole — its records laid into the ledger's columns
with every payload sealed under the ledger's key, and into Kafka record batches with every
record signed (and sealed on encrypted lanes) under the batch id it is accepted as."""

from __future__ import annotations

import pickle

import orjson
from aiokafka.record.default_records import DefaultRecordBatch

from ingest.auth import Principal
from ingest.preparing import prepare_batch_body
from ingest.publisher import Publication
from ledger.crypto import LaneSealer, PayloadCipher, open_lane_value
from schemas import samples
from schemas.envelope import header_map, verify_message

LANES = {"standard": "t.standard", "priority": "t.priority"}
PARTITIONS = {"t.standard": [0, 1, 2, 3], "t.priority": [0, 1]}
AT_REST = PayloadCipher([("e1", bytes(range(32)))])
ON_LANES = PayloadCipher([("e2", bytes(range(32, 64)))])
SIGNING = ("k1", b"lane-signing-secret")


def _array(text: str) -> list[str]:
    """Postgres array text back to its elements (ledger.db.array_literal, no NULLs)."""
    return [v.strip('"').replace("\\\\", "\\") for v in text[1:-1].split(",")]


def test_a_big_batch_comes_back_from_the_worker_process_laid_out_for_ledger_and_lanes() -> None:
    who = Principal("trader-1", "power-east", frozenset({"settlements:write"}), None, None, None)
    run = samples.run_id()
    raw = orjson.dumps({"records": samples.mixed_batch(run, 300, contracts=20, prefix="PREP")})
    publication = Publication(
        LaneSealer(SIGNING, ON_LANES),
        LANES,
        "power-east",
        "trader-1",
        "tr-1",
        "b_1",
        partitions=PARTITIONS,
    )
    prepared = prepare_batch_body(raw, who, run, LANES, publication, AT_REST)
    # as it crosses from the worker process (our own bytes, never a client's)
    back = pickle.loads(pickle.dumps(prepared, pickle.HIGHEST_PROTOCOL))  # noqa: S301
    assert back == prepared
    envelopes = back.envelopes
    assert [r.message_id for r in back.records] == [e.message_id for e in envelopes]

    assert back.columns is not None
    ids = _array(back.columns.params["ids"])
    assert ids == [e.message_id for e in envelopes]
    for envelope, sealed in zip(envelopes, _array(back.columns.params["payloads"]), strict=True):
        payload = bytes.fromhex(sealed.removeprefix("\\x"))
        assert AT_REST.open("e1", payload, envelope.message_id) == envelope.value

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
