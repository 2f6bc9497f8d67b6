"""The CPU part of accepting a request, free of the event loop and of the web framework:
validate every record, check it against the headers and the token, serialize and sign it, hash
the request, and lay the records out as the ledger takes them. For a big batch all of it —
parsing the body included — runs in a worker process (`prepare_batch_body`), so these are plain
functions of picklable values.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from ingest.auth import Principal
from ingest.body import parse_json
from ingest.problems import Problem
from ingest.publisher import Publication
from ledger.acceptance import Columns, RecordToAccept, columns_for, join_columns
from ledger.crypto import PayloadCipher
from runtime.cpu import Joined, Packed
from runtime.kafka import BuiltBatch
from schemas.envelope import Envelope, FieldError, envelope_for, lane_for, validate_record
from schemas.records import CanonicalRecord

MAX_BATCH = 5000
MAX_REPORTED_ERRORS = 200


class PartKeys(NamedTuple):
    """What joining a batch's parts (`join_parts`) needs of each, made where the part is: its
    message ids one after the other (the request hash is taken over them in order), and an
    8-byte digest of each record's identity and revision (to find one in two parts)."""

    ids: bytes
    slots: bytes


def part_keys(envelopes: Sequence[Envelope]) -> PartKeys:
    return PartKeys(
        "".join([e.message_id for e in envelopes]).encode(),
        b"".join(
            [
                hashlib.blake2b(f"{e.identity}\0{e.revision}".encode(), digest_size=8).digest()
                for e in envelopes
            ]
        ),
    )


class Prepared(NamedTuple):
    """A request's records, ready to be recorded, published and answered. For a big batch it is
    built in a worker process and everything per record is done there — the answer's list of
    messages included, already encoded: building and encoding a 5,000-entry answer on the
    event loop held it for 8 to 13 ms per batch while other desks' requests waited."""

    envelopes: Sequence[Envelope]  # a big batch's: Packed (runtime.cpu)
    request_hash: str
    records: Sequence[RecordToAccept]
    lanes: dict[str, int]  # records per lane, for the acceptance metrics
    messages_json: bytes  # a batch's answer `messages`: [{"index": i, "message_id": …}, …]
    # every record signed, sealed and laid into Kafka record batches, when the request was
    # prepared with a Publication (a big batch, in a worker process); else built at publishing
    kafka: list[BuiltBatch] | None = None
    # the records as the ledger's statements take them, payloads sealed (ledger.acceptance
    # `columns_for`), when prepared with the ledger's cipher; else built by the ledger
    columns: Columns | None = None
    # a part of a batch prepared in parts (`prepare_batch_body` with `part`), for `join_parts`
    part_keys: PartKeys | None = None


def field_errors(errors: Sequence[FieldError], *, batch: bool) -> Problem:
    listed = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        path = ("records", error.index, *error.loc) if batch else error.loc
        listed.append(
            {
                "index": error.index,
                "field": error.pointer,
                "pointer": "/" + "/".join(str(p) for p in path),
                "message": error.message,
            }
        )
    first = listed[0]
    where = f"record {first['index']}, " if batch else ""
    return Problem(
        422,
        "schema_violation",
        f"{len(errors)} schema violation(s); first: {where}{first['field'] or 'body'}: "
        f"{first['message']}",
        errors=listed,
    )


def validate(raw_records: Sequence[Any], *, batch: bool, first: int = 0) -> list[CanonicalRecord]:
    """`first`: the index in its request of the first of `raw_records` (a part of a batch)."""
    records: list[CanonicalRecord] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(raw_records, first):
        result = validate_record(raw, index if batch else None)
        if isinstance(result, list):
            errors.extend(result)
        else:
            records.append(result)
    if errors:
        raise field_errors(errors, batch=batch)
    return records


def request_hash(route: str, run_id: str, envelopes: Sequence[Envelope]) -> str:
    digest = hashlib.sha256(f"{route}\0{run_id}\0".encode())
    digest.update("".join([e.message_id for e in envelopes]).encode())
    return digest.hexdigest()


def reject_internal_conflicts(
    envelopes: Sequence[Envelope], *, batch: bool, first: int = 0
) -> None:
    seen: dict[tuple[str, int], str] = {}
    for index, envelope in enumerate(envelopes, first):
        slot = (envelope.identity, envelope.revision)
        if seen.setdefault(slot, envelope.message_id) != envelope.message_id:
            raise Problem(
                409,
                "revision_conflict",
                "two records in this request share identity and revision with "
                "different content; send a higher revision",
                index=index if batch else None,
            )


def prepare(
    who: Principal, raw_records: Sequence[Any], *, route: str, run_id: str, first: int = 0
) -> tuple[list[Envelope], str]:
    """The CPU part of an acceptance (run off the loop for big batches): validate every record,
    check it against the headers and the token, serialize and sign it, hash the request (or
    the part of a batch that starts at index `first`)."""
    batch = route == "batch"
    records = validate(raw_records, batch=batch, first=first)
    for index, record in enumerate(records, first):
        if record.settlement_run_id != run_id:
            raise Problem(
                400,
                "run_id_mismatch",
                "X-Settlement-Run-ID does not match the record's settlement_run_id",
                index=index if batch else None,
            )
        if not who.may_touch_contract(record.contract_id):
            raise Problem(
                403,
                "contract_not_allowed",
                f"this token may not submit contract {record.contract_id}",
                index=index if batch else None,
            )
    envelopes = [envelope_for(who.desk, record) for record in records]
    reject_internal_conflicts(envelopes, batch=batch, first=first)
    return envelopes, request_hash(route, run_id, envelopes)


def shape_problem(detail: str, fields: list[str], message: str) -> Problem:
    """The batch body's own shape is wrong (not any record in it)."""
    return Problem(
        422,
        "schema_violation",
        detail,
        errors=[
            {"index": None, "field": f, "pointer": f"/{f}", "message": message} for f in fields
        ],
    )


def records_to_accept(
    envelopes: Sequence[Envelope], lanes: Mapping[str, str], first: int = 0
) -> list[RecordToAccept]:
    """The records as the ledger takes them; `lanes` maps a lane to its topic."""
    return [
        RecordToAccept(
            index=i,
            message_id=e.message_id,
            identity=e.identity,
            contract_id=e.contract_id,
            market=e.market,
            revision=e.revision,
            topic=lanes[lane_for(e.market)],
            position_mwh=e.position_mwh,
            value=e.value,
        )
        for i, e in enumerate(envelopes, first)
    ]


def prepare_request(
    who: Principal,
    raw_records: Sequence[Any],
    *,
    route: str,
    run_id: str,
    lanes: Mapping[str, str],
    first: int = 0,
) -> Prepared:
    envelopes, digest = prepare(who, raw_records, route=route, run_id=run_id, first=first)
    answer = (
        orjson.dumps(
            [{"index": i, "message_id": e.message_id} for i, e in enumerate(envelopes, first)]
        )
        if route == "batch"
        else b""
    )
    return Prepared(
        envelopes,
        digest,
        records_to_accept(envelopes, lanes, first),
        dict(collections.Counter(e.lane for e in envelopes)),
        answer,
    )


def batch_records(body: Any) -> list[Any]:
    """The `records` of a batch body, once its own shape is right."""
    if not isinstance(body, dict) or "records" not in body:
        raise shape_problem("body must be an object with `records`", ["records"], "field required")
    extra = sorted(set(body) - {"records"})
    if extra:
        raise shape_problem(
            f"unknown field(s): {', '.join(extra)}", extra, "extra fields not permitted"
        )
    records = body["records"]
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_BATCH:
        raise shape_problem(
            f"records must be a list of 1..{MAX_BATCH} records",
            ["records"],
            f"1..{MAX_BATCH} records",
        )
    return records


def prepare_batch_body(
    raw: bytes,
    who: Principal,
    run_id: str,
    lanes: Mapping[str, str],
    publication: Publication | None = None,
    cipher: PayloadCipher | None = None,
    part: tuple[int, int] = (0, 1),
) -> Prepared:
    """A whole batch from its body's bytes (run in a worker process for a big body), with its
    records laid into Kafka record batches when given their `publication`, and into the
    ledger's columns when given its `cipher`: signing, sealing and encoding 5,000 records in
    the intake's own threads held its GIL ~115 ms per batch, which every other desk's request
    waited for at each turn of the event loop.

    `part` (i, k): only the i-th of k consecutive slices of the records, with the indices they
    have in the whole batch, so that k worker processes prepare one batch together
    (`join_parts`). Each parses the whole body: its shape, and any problem in it, are the
    whole batch's."""
    records = batch_records(parse_json(raw))
    i, k = part
    lo, hi = len(records) * i // k, len(records) * (i + 1) // k
    prepared = prepare_request(
        who, records[lo:hi], route="batch", run_id=run_id, lanes=lanes, first=lo
    )
    # Per-record objects go back to the serving process packed (runtime.cpu.Packed): a batch
    # whose records are all new is recorded and published from its columns and record batches,
    # and only counts them. The records are the envelopes again, each with its index and topic.
    envelopes = Packed(prepared.envelopes)
    accepted = Packed.derived(prepared.records, records_to_accept, envelopes, dict(lanes), lo)
    columns = columns_for(prepared.records, cipher) if cipher is not None else None
    if columns is not None:  # each message once: the records themselves, unless one is twice
        unique = accepted if len(columns.unique) == len(accepted) else Packed(columns.unique)
        columns = dataclasses.replace(columns, unique=unique)
    return prepared._replace(
        envelopes=envelopes,
        records=accepted,
        kafka=publication.lay_out(prepared.envelopes) if publication is not None else None,
        columns=columns,
        part_keys=part_keys(prepared.envelopes) if k > 1 else None,
    )


# Problems a part finds in its own records alone, which the whole batch finds in the same
# words when no other part has any (422: every record validated, the errors listed in order;
# 400/403: the first record, in order, with another run's id or a contract the token may not
# touch). A revision conflict is not one of them: a record in another part may collide first.
# A problem of the body itself (its shape, its JSON) every part finds, so it is never alone.
_PART_PROBLEMS = frozenset({"schema_violation", "run_id_mismatch", "contract_not_allowed"})


def settle_parts(
    outcomes: Sequence[Prepared | BaseException], run_id: str
) -> Prepared | Problem | None:
    """What a batch prepared in consecutive parts comes to: the batch (`join_parts`), the
    problem that is the whole batch's answer (one part alone refused it, for one of its own
    records), or None when only the whole batch, prepared in one piece, can say."""
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if not failed:
        return join_parts([o for o in outcomes if isinstance(o, Prepared)], run_id)
    [problem, *others] = failed
    if others or not isinstance(problem, Problem) or problem.code not in _PART_PROBLEMS:
        return None
    return problem


def join_parts(parts: Sequence[Prepared], run_id: str) -> Prepared | None:
    """One batch from its consecutive parts, each prepared alone (`prepare_batch_body` with
    `part`), as if prepared whole; None when two parts hold records of one identity and
    revision (the same record twice, or a conflict — or two digests alike by chance): whether
    that request is refused, and how, is for the whole batch's own preparation to say. It runs
    on the event loop, so no part's records are opened (runtime.cpu.Joined): the check and the
    request hash use what each part made of them (`PartKeys`)."""
    parts = [part for part in parts if len(part.envelopes)]  # more parts than records
    keys = [part.part_keys for part in parts if part.part_keys is not None]
    if len(keys) != len(parts):
        raise ValueError("parts are prepared with part keys (prepare_batch_body with part)")
    seen: set[int] = set()
    digest = hashlib.sha256(f"batch\0{run_id}\0".encode())
    for key in keys:
        slots = set(memoryview(key.slots).cast("Q"))
        if not seen.isdisjoint(slots):
            return None
        seen |= slots
        digest.update(key.ids)  # as request_hash, over every message id in order
    lanes: collections.Counter[str] = collections.Counter()
    for part in parts:
        lanes.update(part.lanes)
    kafka = [p.kafka for p in parts]
    columns = [p.columns for p in parts if p.columns is not None]
    return Prepared(
        Joined([p.envelopes for p in parts]),
        digest.hexdigest(),
        Joined([p.records for p in parts]),
        dict(lanes),
        b"[" + b",".join(p.messages_json[1:-1] for p in parts) + b"]",
        None if None in kafka else [b for built in kafka if built for b in built],
        join_columns(columns, Joined([c.unique for c in columns]))
        if len(columns) == len(parts)
        else None,
    )
