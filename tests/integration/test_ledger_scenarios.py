"""One set of ledger scenarios, run against the in-memory ledger the unit tests use
(tests/fakes.FakeLedger) and against the real one on Postgres (ledger.acceptance.IntakeStore,
ledger.delivery.DeliveryStore): the fake may only stand in for what the real ledger does."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.deps import IntakeLedger
from ingest.publisher import SettlementPublisher
from ledger import audit
from ledger.acceptance import Busy, IntakeStore, KeyHeld, Pending, RevisionConflict
from ledger.crypto import LaneSealer, PayloadCipher
from ledger.db import fetch_direct, make_engine
from ledger.delivery import DeliveryStore
from ledger.rows import Actor, AuditEvent, ClaimRequest, DeadLetterRow, LateTaken, Outcome
from schemas import samples
from schemas.envelope import header_map, publication_of
from schemas.states import BatchState, DeadLetterReason, MessageState
from tests.conftest import Infra, fresh_database
from tests.fakes import Desk, FakeBroker, FakeLedger
from workers.pipeline import DeliveryLedger

S = MessageState
LANES = {"standard": "scn.standard", "priority": "scn.priority"}
WORKER = Actor("worker", "scenario-worker")


@dataclass
class Backend:
    intake: IntakeLedger
    worker: DeliveryLedger
    desk: Desk
    broker: FakeBroker
    expire_leases: Callable[[], Awaitable[None]]
    state: Callable[[str], Awaitable[MessageState]]


@pytest.fixture(params=["memory", "postgres"])
def where(request: pytest.FixtureRequest) -> Infra | None:
    """None for the in-memory ledger; the test servers for the real one."""
    return request.getfixturevalue("infra") if request.param == "postgres" else None


@pytest.fixture
async def backend(where: Infra | None) -> AsyncIterator[Backend]:
    broker = FakeBroker()
    publisher = SettlementPublisher(broker, LANES, LaneSealer(("k1", b"scenario-key")))
    if where is None:
        fake = FakeLedger(lease_s=10.0)

        async def expire() -> None:
            fake.now += 60

        async def state_in_memory(message_id: str) -> MessageState:
            return fake.rows[message_id].state

        yield Backend(fake, fake, Desk(fake, publisher), broker, expire, state_in_memory)
        return
    engine = make_engine(await fresh_database(where), 4)
    cipher = PayloadCipher([("e1", b"\x01" * 32)])
    intake = IntakeStore(engine, cipher)
    worker = DeliveryStore(engine, cipher, owner="scenario", lease_s=10.0, actor=WORKER)

    async def expire_in_db() -> None:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE messages SET lease_until = now() - interval '1 second'")
            )

    async def state_in_db(message_id: str) -> MessageState:
        async with engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT state FROM messages WHERE message_id = :m"), {"m": message_id}
            )
        return MessageState(found)

    try:
        yield Backend(intake, worker, Desk(intake, publisher), broker, expire_in_db, state_in_db)
    finally:
        await engine.dispose()


def otc(run: str, trade: str, revision: int = 1, volume: str = "400") -> dict[str, Any]:
    return samples.otc_confirmation(run, f"{trade}-0000", revision=revision, volume=volume)


async def claim(b: Backend, message_id: str, publication: str | None = None) -> Any:
    if publication is None:
        publication = next(
            publication_of(h)
            for _, _, _, headers in b.broker.records
            if (h := header_map(headers))["message_id"] == message_id
        )
    [row] = await b.worker.claim([ClaimRequest(message_id, publication, 0, 0)])
    return row


async def test_acceptance_pending_then_accepted_and_the_key_is_held(b: Backend) -> None:
    run = samples.run_id()
    request = b.desk.request([otc(run, "SCN-A1")], key="key-1")
    pending = await b.intake.begin(request)
    assert isinstance(pending, Pending)
    assert [r.message_id for r in pending.to_publish] == [request.records[0].message_id]
    assert await b.intake.state_of(request.batch_id) is BatchState.PENDING
    assert await b.intake.get_message(request.records[0].message_id, None) is None
    again = await b.intake.begin(b.desk.request([otc(run, "SCN-A1")], key="key-1"))
    assert isinstance(again, KeyHeld)
    assert again.state == "in_flight"
    assert await b.intake.complete(request, WORKER, 1)
    assert await b.intake.state_of(request.batch_id) is BatchState.ACCEPTED
    message = await b.intake.get_message(request.records[0].message_id, "power-east")
    assert message is not None
    assert message.state is S.QUEUED
    assert await b.intake.get_message(request.records[0].message_id, "gas-west") is None
    done = await b.intake.begin(b.desk.request([otc(run, "SCN-A1")], key="key-1"))
    assert isinstance(done, KeyHeld)
    assert (done.state, done.resource_id) == ("completed", request.batch_id)


async def test_an_aborted_request_leaves_its_key_and_records_free(b: Backend) -> None:
    run = samples.run_id()
    request = b.desk.request([otc(run, "SCN-B1")], key="key-b")
    assert isinstance(await b.intake.begin(request), Pending)
    assert await b.intake.abort(request)
    assert not await b.intake.complete(request, WORKER, 1)
    assert await b.intake.state_of(request.batch_id) is BatchState.ABORTED
    retry = b.desk.request([otc(run, "SCN-B1")], key="key-b")
    pending = await b.intake.begin(retry)
    assert isinstance(pending, Pending)
    assert len(pending.to_publish) == 1


async def test_a_copy_read_while_its_request_is_accepted_is_leased_only_once_accepted(
    b: Backend,
) -> None:
    """A worker may read a record's copy before the intake has completed its request (the
    publish acknowledged, `complete` not yet committed): the claim says pending and takes no
    lease, however often it is tried; once the request is accepted the record is leased; a
    record of a request aborted meanwhile never is (the real ledger writes records `queued`
    under the pending batch: tables.accepting_sql)."""
    run = samples.run_id()
    accepted = b.desk.request([otc(run, "SCN-P1"), otc(run, "SCN-P2")])
    aborted = b.desk.request([otc(run, "SCN-P3")])
    for request in (accepted, aborted):
        assert isinstance(await b.intake.begin(request), Pending)
    first, second = (r.message_id for r in accepted.records)
    [lost] = (r.message_id for r in aborted.records)
    for _ in range(2):
        early = await claim(b, first, accepted.batch_id)
        assert (early.state, early.epoch, early.pending_expired) == (S.PENDING, None, False)
    assert await b.intake.abort(aborted)
    gone = await claim(b, lost, aborted.batch_id)
    assert (gone.state, gone.epoch) == (S.ABORTED, None)
    assert await b.intake.complete(accepted, WORKER, 2)
    for m in (first, second):
        leased = await claim(b, m, accepted.batch_id)
        assert (leased.state, leased.epoch) == (S.QUEUED, 1)
    assert await b.state(lost) is S.ABORTED


async def test_records_being_accepted_elsewhere_are_busy_and_revisions_conflict(
    b: Backend,
) -> None:
    run = samples.run_id()
    first = b.desk.request([otc(run, "SCN-C1")])
    assert isinstance(await b.intake.begin(first), Pending)
    busy = await b.intake.begin(b.desk.request([otc(run, "SCN-C1")]))
    assert isinstance(busy, Busy)
    assert await b.intake.complete(first, WORKER, 1)
    conflict = await b.intake.begin(
        b.desk.request([otc(run, "SCN-C2"), otc(run, "SCN-C1", volume="401")])
    )
    assert isinstance(conflict, RevisionConflict)
    assert (conflict.index, conflict.conflicting_message_id) == (
        1,
        first.records[0].message_id,
    )
    already = await b.intake.begin(b.desk.request([otc(run, "SCN-C1")]))
    assert isinstance(already, Pending)
    assert already.to_publish == []  # accepted before: not published again


async def test_requests_racing_for_the_same_new_records_take_them_once(b: Backend) -> None:
    """Requests under different keys for the same never-seen records, all at once (the ledger
    takes a fresh request in one statement): exactly one takes them, the others are Busy and
    leave nothing behind — retried as they are (same batch id), they go through and take
    nothing once the winner is accepted."""
    run = samples.run_id()
    for round_ in range(6):
        raws = [otc(run, f"SCN-R{round_}"), otc(run, f"SCN-S{round_}")]
        requests = [b.desk.request(raws, key=f"race-{round_}-{i}") for i in range(4)]
        begun = await asyncio.gather(*(b.intake.begin(r) for r in requests))
        won = [r for r, x in zip(requests, begun, strict=True) if isinstance(x, Pending)]
        assert len(won) == 1, begun
        assert [len(x.to_publish) for x in begun if isinstance(x, Pending)] == [2]
        assert sum(isinstance(x, Busy) for x in begun) == 3, begun
        assert await b.intake.complete(won[0], WORKER, 2)
        for request in requests:
            if request is not won[0]:
                retried = await b.intake.begin(request)
                assert isinstance(retried, Pending), retried
                assert retried.to_publish == []
                assert await b.intake.complete(request, WORKER, 0)


async def test_one_lease_at_a_time_and_writes_are_fenced_by_it(b: Backend) -> None:
    run = samples.run_id()
    [m] = await b.desk.accept([otc(run, "SCN-D1")])
    first = await claim(b, m)
    assert (first.epoch, first.state, first.attempts) == (1, S.QUEUED, 0)
    second = await claim(b, m)
    assert second.epoch is None
    assert second.lease_live
    assert second.state is S.DELIVERING
    await b.expire_leases()
    taken_over = await claim(b, m)
    assert (taken_over.epoch, taken_over.attempts) == (2, 1)  # the first POST counted
    stale, live = await b.worker.write(
        [
            Outcome(m, 1, S.DELIVERED, 1, 0.1, upstream_transaction_id="TX-OLD"),
            Outcome(m, 2, S.DELIVERED, 2, 0.2, upstream_transaction_id="TX-NEW"),
        ]
    )
    assert (stale, live) == (False, True)
    assert await b.state(m) is S.DELIVERED
    done = await claim(b, m)
    assert (done.epoch, done.state) == (None, S.DELIVERED)


async def test_a_stale_copy_is_not_live_and_an_unknown_id_does_not_exist(b: Backend) -> None:
    run = samples.run_id()
    [m] = await b.desk.accept([otc(run, "SCN-E1")])
    stale = await claim(b, m, publication="batch_other")
    assert (stale.exists, stale.live_copy, stale.epoch) == (True, False, None)
    unknown = await claim(b, "m_" + "0" * 40, publication="batch_other")
    assert not unknown.exists


async def test_claims_see_earlier_records_and_the_highest_revision_taken(b: Backend) -> None:
    run = samples.run_id()
    first, second = await b.desk.accept([otc(run, "SCN-F1", 2, "1"), otc(run, "SCN-F1", 3, "2")])
    row = await claim(b, second)
    assert row.predecessors.waiting == 1
    assert row.max_taken_revision is None
    # It would only wait: its claim is a read — no lease, no attempt, nothing to hand back.
    assert row.epoch is None
    assert await b.state(second) is S.QUEUED
    lead = await claim(b, first)
    assert lead.predecessors.waiting == 0
    assert await b.worker.write([Outcome(first, lead.epoch, S.DELIVERED, 1, 0.0)]) == [True]
    [lower] = await b.desk.accept([otc(run, "SCN-F1", 1, "3")])
    row = await claim(b, lower)
    assert row.max_taken_revision == 2
    assert row.revision == 1
    # Behind `second`, yet superseded: leased all the same, so it can be settled as such.
    assert row.predecessors.waiting == 1
    assert row.epoch is not None
    now = await claim(b, second)
    assert (now.epoch, now.attempts, now.predecessors.waiting) == (1, 0, 0)


async def test_a_late_answer_closes_a_dead_letter_that_guessed_wrong(b: Backend) -> None:
    run = samples.run_id()
    [m] = await b.desk.accept([otc(run, "SCN-G1")])
    row = await claim(b, m)
    now = datetime.now(UTC)
    topic, key, value, headers = b.broker.records[-1]
    dead = DeadLetterRow(
        dead_letter_id="dl_scenario_g1",
        dedupe_key=f"claim:{m}:{row.epoch}",
        reason=DeadLetterReason.RETRIES_EXHAUSTED,
        error_status=503,
        attempts=4,
        last_error="503: maintenance",
        first_attempt_at=now,
        last_attempt_at=now,
        source_topic=topic,
        source_partition=0,
        source_offset=0,
        kafka_key=key,
        kafka_value=value,
        headers=list(headers),
        message_id=m,
        desk="power-east",
    )
    written = await b.worker.write(
        [
            Outcome(
                m,
                row.epoch,
                S.DEAD_LETTERED,
                4,
                1.0,
                dead_letter_id=dead.dead_letter_id,
                dead_letter=dead,
            )
        ]
    )
    assert written == [True]
    late = LateTaken(m, S.DELIVERED, "TX-LATE", Decimal("400.000"), "late answer", None)
    assert await b.worker.record_late_taken(late)
    assert await b.state(m) is S.DELIVERED
    assert not await b.worker.record_late_taken(late)  # once


@pytest.fixture
def b(backend: Backend) -> Backend:
    return backend


async def test_concurrent_claims_hand_out_one_lease(b: Backend) -> None:
    run = samples.run_id()
    [m] = await b.desk.accept([otc(run, "SCN-H1")])
    rows = await asyncio.gather(*(claim(b, m) for _ in range(8)))
    assert [r.epoch for r in rows if r.epoch is not None] == [1]


async def test_keys_past_their_retention_are_forgotten_and_a_late_retry_sends_nothing_twice(
    infra: Infra,
) -> None:
    """Postgres only (the expiry job runs SQL): a completed key older than the retention goes,
    an in-flight one stays; the same request under the forgotten key publishes nothing again,
    because its records' ids are derived from their content."""
    from ledger.acceptance import forget_keys

    engine = make_engine(await fresh_database(infra), 2)
    intake = IntakeStore(engine, PayloadCipher([("e1", b"\x01" * 32)]))
    desk = Desk(
        intake, SettlementPublisher(FakeBroker(), LANES, LaneSealer(("k1", b"scenario-key")))
    )
    run = samples.run_id()
    try:
        done = desk.request([otc(run, "KEEP-A1")], key="old-key")
        assert isinstance(await intake.begin(done), Pending)
        assert await intake.complete(done, WORKER, 1)
        flying = desk.request([otc(run, "KEEP-B1")], key="in-flight-key")
        assert isinstance(await intake.begin(flying), Pending)
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
            )
        assert await forget_keys(engine, retention_s=24 * 3600) == 1
        async with engine.connect() as conn:
            left = (await conn.execute(text("SELECT key FROM idempotency_keys"))).scalars().all()
        assert left == ["in-flight-key"]
        again = await intake.begin(desk.request([otc(run, "KEEP-A1")], key="old-key"))
        assert isinstance(again, Pending)
        assert again.to_publish == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("ping_idle_s", [0.0, 60.0], ids=["pinged-when-idle", "closed-socket"])
async def test_a_pooled_connection_the_server_dropped_is_replaced_not_handed_out(
    infra: Infra, monkeypatch: pytest.MonkeyPatch, ping_idle_s: float
) -> None:
    """The pool no longer pings on every checkout (ledger.db): a connection whose socket the
    server closed, or one idle past the threshold that fails its ping, must be replaced at
    checkout — the statement that follows runs on a fresh connection and does not fail."""
    import ledger.db

    monkeypatch.setattr(ledger.db, "PING_IDLE_S", ping_idle_s)
    url = await fresh_database(infra)
    engine, other = make_engine(url, 1), make_engine(url, 1)
    try:
        async with engine.connect() as conn:
            first = await conn.scalar(text("SELECT pg_backend_pid()"))
        async with other.connect() as conn:
            assert await conn.scalar(text("SELECT pg_terminate_backend(:p)"), {"p": first})
        await asyncio.sleep(0.3)  # the closed socket is noticed by the pooled connection
        async with engine.connect() as conn:
            second = await conn.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        await engine.dispose()
        await other.dispose()


async def _many_records_and_one(
    engine: AsyncEngine,
    many: str,
    one: str,
    state: str,
    publication: str,
    behind: str | None = None,
) -> None:
    """A new database's `messages`, never analyzed: 20,000 records of one desk in state
    `many`, and the record `one` in `state` (parked behind `behind`, if given)."""
    from ledger.db import fetch_direct

    await fetch_direct(
        engine,
        """INSERT INTO messages (message_id, desk, trader, settlement_run_id, contract_id,
                market, identity_hash, revision, topic, state, publication, accept_seq,
                submitted_position_mwh, payload, payload_kid, trace_id, parked_behind)
           SELECT 'm' || n, 'big-desk', 't', 'run', 'C-' || (n % 500), 'ERCOT',
                  'i' || n, 1, 'lane', CAST(:many AS text), 'batch_' || (n / 5000), n, 1,
                  ''::bytea, 'k', 'x', NULL
             FROM generate_series(1, 20000) AS n
           UNION ALL
           SELECT CAST(:one AS text), 'desk', 't', 'run', 'C-1', 'ERCOT', 'i-' || :one, 1,
                  'lane', CAST(:state AS text), CAST(:publication AS text), 20001, 1,
                  ''::bytea, 'k', 'x', CAST(:behind AS text)""",
        {"many": many, "one": one, "state": state, "publication": publication, "behind": behind},
    )


async def test_aborting_an_acceptance_does_not_read_every_open_record(infra: Infra) -> None:
    """A new database, never analyzed, with 20,000 open records (one desk's big batches, no
    worker yet): aborting a one-record acceptance finds its record through its request's list
    and the record's primary key. (Completing one writes no record at all: its records went in
    `queued` under the pending batch.) Reading the open-records index instead cost 5.2 ms per
    single-record request when completing worked that way (auto_explain: 75,519 entries)."""
    from ledger.db import fetch_direct

    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    try:
        await _many_records_and_one(engine, "queued", "single", "queued", "batch_single")
        plan = "\n".join(
            row[0]
            for row in await fetch_direct(
                engine,
                "EXPLAIN WITH gone AS (SELECT CAST('batch_single' AS text) AS batch_id) "
                "UPDATE messages m SET state = 'aborted' "
                "FROM gone JOIN batch_messages l ON l.batch_id = gone.batch_id "
                "WHERE m.message_id = l.message_id AND m.publication = gone.batch_id "
                "AND m.publication_kind = 'intake' AND m.state IN ('pending', 'queued')",
                {},
            )
        )
        assert "messages_pkey" in plan, plan
        assert "messages_contract_open" not in plan, plan
    finally:
        await engine.dispose()


async def test_a_fresh_acceptance_reads_no_record_even_in_a_plan_made_on_an_empty_table(
    infra: Infra,
) -> None:
    """The plan Postgres caches for a connection's prepared statement is made from the table
    as it was then: on a new database, `messages` empty and never analyzed. A fresh acceptance
    must not read `messages` in that plan either (with `message_id = ANY(:ids)` it was a
    sequential scan, kept while the table grew: each single record read every row until
    autovacuum's first ANALYZE — 1.7 ms of Postgres CPU per request at ~5,000 rows, measured
    with pg_stat_statements). It looks nothing up now: a record already there fails its
    insert on the primary key."""
    import asyncpg

    from ledger.acceptance import _FRESH_SQL
    from ledger.db import _positional

    url = await fresh_database(infra)
    query, names = _positional(_FRESH_SQL)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f"PREPARE fresh AS {query}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        nulls = ", ".join("NULL" for _ in names)
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE fresh({nulls})"))
        assert "Insert on messages" in plan, plan
        assert " on messages m" not in plan, plan  # no scan of it, by index or whole
        assert "Scan on messages" not in plan, plan
        assert "Scan using" not in plan, plan
    finally:
        await conn.close()


async def test_looking_for_parked_records_does_not_read_every_record(infra: Infra) -> None:
    """A database of 20,000 delivered records and one parked: the continuation job (every
    worker, a few times a minute) and the dead-letter list's parked counts read the parked
    records through their partial index. Before it (migration 0008) both were sequential
    scans of every record ever accepted: 24 ms per continuation at ~40,000 rows."""
    from ledger.db import fetch_direct
    from ledger.reconciliation import _PARKED_BEHIND, _RUNNABLE_PARKED

    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    try:
        await _many_records_and_one(engine, "delivered", "parked", "parked", "batch_p", "m1")
        for statement in (
            _RUNNABLE_PARKED,
            f"SELECT d.dead_letter_id, {_PARKED_BEHIND} FROM dead_letters d",  # noqa: S608
        ):
            plan = "\n".join(
                row[0] for row in await fetch_direct(engine, f"EXPLAIN {statement}", {})
            )
            assert "messages_parked" in plan, plan
            assert "Seq Scan on messages" not in plan, plan
    finally:
        await engine.dispose()


async def test_array_text_reads_back_as_the_same_values_in_postgres(infra: Infra) -> None:
    """ledger.db.array_literal against Postgres's own parser: quotes, backslashes, braces,
    commas, blanks, the word NULL, empty strings, non-ASCII and seeded random text; integers;
    bytes of every value."""
    import random

    from ledger.db import array_literal, fetch_direct

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(1, 0x2FF)] + ["€", "日", "\U0001f600", "\\x41"]
    texts = ["", " ", "NULL", "null", '"', "\\", '\\"', "{}", "{a,b}", ",", "a b", "\\x00"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    blobs = [b"", bytes(range(256)), b'"\\{},']
    blobs += [rng.randbytes(rng.randint(0, 64)) for _ in range(50)]
    numbers = [0, -1, 2**31 - 1, -(2**31), 7]
    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    try:
        [row] = await fetch_direct(
            engine,
            "SELECT CAST(CAST(:t AS text) AS text[]) AS t, CAST(CAST(:b AS text) AS bytea[]) AS b,"
            " CAST(CAST(:n AS text) AS int[]) AS n,"
            " CAST(CAST(:p AS text) AS numeric[]) AS p",
            {
                "t": array_literal(texts),
                "b": array_literal(blobs),
                "n": array_literal(numbers),
                "p": array_literal(["1.5", "-0.000001", "123456789.123"]),
            },
        )
        assert list(row["t"]) == texts
        assert [bytes(b) for b in row["b"]] == blobs
        assert list(row["n"]) == numbers
        assert [str(p) for p in row["p"]] == ["1.5", "-0.000001", "123456789.123"]
        [empty] = await fetch_direct(
            engine, "SELECT CAST(CAST(:e AS text) AS text[]) AS e", {"e": array_literal([])}
        )
        assert list(empty["e"]) == []
    finally:
        await engine.dispose()


async def test_a_desk_read_is_planned_for_its_own_parameters_every_time(infra: Infra) -> None:
    """The desks' reads run on an engine made with `custom_plans`: Postgres never switches
    them to the session's cached generic plan (made once from the statistics of that moment,
    e.g. of tables still nearly empty, and kept while they grow). The plain engine does switch
    after five executions, which is what this tells apart."""
    from ledger import reads
    from ledger.db import fetch_direct

    url = await fresh_database(infra)
    counts = {}
    for custom in (True, False):
        engine = make_engine(url, 1, custom_plans=custom)
        try:
            for _ in range(8):
                assert await reads.get_batch(engine, "batch_nowhere", "power-east") is None
            [row] = await fetch_direct(
                engine,
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%FROM batches b%LEFT JOIN%' "
                "AND statement NOT LIKE '%pg_prepared_statements%'",
                {},
            )
            counts[custom] = (row["generic_plans"], row["custom_plans"])
        finally:
            await engine.dispose()
    assert counts[True] == (0, 8)
    assert counts[False][0] > 0


async def test_a_direct_statement_keeps_its_connection_only_after_a_server_refusal(
    infra: Infra,
) -> None:
    """ledger.db.fetch_direct: a statement the server refused leaves the connection reusable;
    one cancelled mid-statement (or broken on the client side, as asyncpg's
    InternalClientError during a restart) is not handed to the next statement — that runs on
    a fresh connection and succeeds."""
    import asyncpg

    from ledger.db import database_unavailable, fetch_direct

    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    try:
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        first = row["pid"]
        with pytest.raises(asyncpg.PostgresError):
            await fetch_direct(engine, "SELECT 1 / :zero", {"zero": 0})
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        assert row["pid"] == first  # refused by the server: the same connection
        sleeping = asyncio.create_task(fetch_direct(engine, "SELECT pg_sleep(5)", {}))
        await asyncio.sleep(0.3)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        assert row["pid"] != first  # cancelled mid-statement: a fresh connection
        assert database_unavailable(asyncpg.exceptions.InternalClientError("state"))
        assert not database_unavailable(asyncpg.exceptions.UniqueViolationError("dup"))
    finally:
        await engine.dispose()


async def test_direct_statements_have_a_pool_of_their_own_that_survives_a_dropped_server(
    infra: Infra,
) -> None:
    """ledger.db._Direct: fetch_direct's statements never check a connection out of the
    engine's pool (that checkout and checkin cost as much CPU as the statement); a connection
    the server dropped while it sat in the direct pool is replaced, not handed out (the
    statement after it succeeds); `dispose()` closes the direct pool's connections too, and
    the engine goes on working after it, as SQLAlchemy's own pool does."""
    url = await fresh_database(infra)
    engine, other = make_engine(url, 2), make_engine(url, 1)

    async def gone(pid: int, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while (
            await fetch_direct(
                other, "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = :p", {"p": pid}
            )
        )[0]["n"]:
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.05)

    try:
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        first = row["pid"]
        assert engine.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
        async with other.connect() as conn:
            assert await conn.scalar(text("SELECT pg_terminate_backend(:p)"), {"p": first})
        await gone(first, "the backend did not go")
        await asyncio.sleep(0.3)  # the closed socket is noticed by the idle connection
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        second = row["pid"]
        assert second != first
        await engine.dispose()
        await gone(second, "dispose left it open")
        [row] = await fetch_direct(engine, "SELECT pg_backend_pid() AS pid", {})
        assert row["pid"] not in (first, second)
    finally:
        await engine.dispose()
        await other.dispose()


async def test_a_url_tuning_the_adapter_still_reaches_the_direct_pool(infra: Infra) -> None:
    """A database URL may carry SQLAlchemy's own asyncpg-adapter options; the direct pool
    connects with the rest (asyncpg.connect refuses those: every statement would fail)."""
    url = await fresh_database(infra)
    engine = make_engine(f"{url}?prepared_statement_cache_size=50")
    try:
        [row] = await fetch_direct(engine, "SELECT 1 AS one", {})
        assert row["one"] == 1
    finally:
        await engine.dispose()


async def test_a_sequencer_turn_that_stalls_or_is_cancelled_sequences_nothing(
    infra: Infra,
) -> None:
    """The audit sequencer's turn is one transaction under its advisory lock. While another
    session holds the turn, a sequencer that must not wait skips (0), and one that waits and
    is cancelled there (its process stopping) leaves every row unsequenced. The next turns
    then give each row its place exactly once, and the chain verifies."""
    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    holder = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        actor = Actor("system", "test")
        await audit.record(engine, [AuditEvent(actor, f"test.{i}") for i in range(3)])
        async with holder.transaction():
            await holder.fetch("SELECT pg_advisory_xact_lock($1)", audit._SEQUENCER_LOCK)
            assert await audit.sequence(engine) == 0  # the turn is taken elsewhere: skipped
            waiting = asyncio.create_task(audit.sequence(engine, wait=True))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # it waits for the turn
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        [row] = await fetch_direct(
            engine, "SELECT count(*) FILTER (WHERE hash IS NULL) AS open FROM audit_log", {}
        )
        assert row["open"] == 3
        assert await audit.sequence_all(engine) == 3
        assert await audit.sequence_all(engine) == 0
        verified = await audit.verify(engine)
        assert verified.ok
        assert (verified.rows, verified.head_seq) == (3, 3)
    finally:
        await holder.close()
        await engine.dispose()


_FROZEN_HOLDER = """
import asyncio, sys
from ledger import audit
from ledger.db import make_engine, sql

async def hold() -> None:
    engine = make_engine(sys.argv[1], 1, idle_in_transaction_s=float(sys.argv[2]))
    async with engine.begin() as conn:
        await conn.execute(sql("SELECT pg_advisory_xact_lock(:k)"), {"k": audit._SEQUENCER_LOCK})
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(hold())
"""


async def test_a_process_frozen_holding_the_sequencers_turn_loses_it_to_the_server(
    infra: Infra,
) -> None:
    """A process of ours frozen (SIGSTOP) inside a transaction that holds locks — here the
    audit sequencer's turn — would keep every other process's sequencer waiting until it
    thawed. Its engine has the server end a session idle in a transaction
    (ETRM_DATABASE_IDLE_IN_TRANSACTION_S, 1.5 s here): the others sequence within seconds,
    while the process is still frozen."""
    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FROZEN_HOLDER, url, "1.5", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert line.strip() == b"holding"
        holder.send_signal(signal.SIGSTOP)
        events = [AuditEvent(Actor("system", "test"), f"t.{i}") for i in range(3)]
        await audit.record(engine, events)
        started = time.monotonic()
        assert await asyncio.wait_for(audit.sequence_all(engine), 10) == 3
        assert time.monotonic() - started < 8
        assert (await audit.verify(engine)).ok
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        await holder.wait()
        await engine.dispose()


async def test_requests_racing_for_the_same_new_records_in_opposite_orders_never_fail(
    b: Backend,
) -> None:
    """Two requests for the same never-seen records, listed in opposite orders, at once: each
    waits on a record the other inserted first. One takes them and the other is Busy (then
    takes nothing once the winner is accepted), never an error from the database."""
    run = samples.run_id()
    for round_ in range(6):
        raws = [otc(run, f"SCN-O{round_}{i}") for i in range(40)]
        forward = b.desk.request(raws, key=f"order-{round_}-f")
        backward = b.desk.request(raws[::-1], key=f"order-{round_}-b")
        begun = await asyncio.gather(b.intake.begin(forward), b.intake.begin(backward))
        won = [r for r, x in zip((forward, backward), begun, strict=True) if isinstance(x, Pending)]
        assert len(won) == 1, begun
        assert await b.intake.complete(won[0], WORKER, 40)


async def test_the_oldest_undelivered_record_is_found_without_reading_delivered_ones(
    infra: Infra,
) -> None:
    """A new database, never analyzed, with 20,000 delivered records and one queued: the read
    every scrape and readiness report makes (how long the oldest record has waited) goes
    through the open records' index, which delivered records are not in (migration 0011
    dropped the index by state it used to read)."""
    from ledger.reads import OLDEST_UNDELIVERED_S

    url = await fresh_database(infra)
    engine = make_engine(url, 1)
    try:
        await _many_records_and_one(engine, "delivered", "waiting", "queued", "batch_q")
        plan = "\n".join(
            row[0] for row in await fetch_direct(engine, f"EXPLAIN {OLDEST_UNDELIVERED_S}", {})
        )
        assert "messages_contract_open" in plan, plan
        assert "Seq Scan on messages" not in plan, plan
        [(waited,)] = await fetch_direct(engine, OLDEST_UNDELIVERED_S, {})
        assert 0 <= waited < 60
    finally:
        await engine.dispose()
