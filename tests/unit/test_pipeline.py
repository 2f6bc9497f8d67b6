"""The worker's delivery pipeline with the ledger and the upstream in memory (tests/fakes.py):
what is sent, in what order, what is written under which lease, and when an offset may pass —
including a lease lost mid-POST and a partition revoked mid-POST (issue #6 case 2). The same
pipeline against real Postgres, Kafka and an HTTP simulator is in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from ingest.publisher import SettlementPublisher
from ledger.crypto import LaneSealer
from ledger.rows import Actor, ClaimRequest, MaintenanceWindow, Outcome
from operations.circuit import BreakerConfig, Failed, Succeeded, TakeProbe
from schemas import samples
from schemas.states import CircuitState, DeadLetterReason, MessageState, Sequencing
from tests.fakes import (
    Consumed,
    DatabaseAway,
    Desk,
    FakeBroker,
    FakeCircuitStore,
    FakeLedger,
    FakeUpstream,
    taken,
)
from tests.support import never, wait_for
from workers.breaker import Breaker
from workers.core import Policy
from workers.pipeline import Pipeline
from workers.rules import Answer, AnswerKind
from workers.slots import LaneSlots

S = MessageState
LANES = {"standard": "unit.standard", "priority": "unit.priority"}
KEY = ("k1", b"unit-signing-secret")
POLICY = Policy(
    max_attempts=4,
    budget_s=5.0,
    backoff_base_s=0.01,
    backoff_cap_s=0.05,
    drift_threshold=Decimal("0.5"),
)
TRANSIENT = Answer(AnswerKind.TRANSIENT, 503, "503: maintenance")


@dataclass
class Harness:
    ledger: FakeLedger
    broker: FakeBroker
    upstream: FakeUpstream
    desk: Desk
    pipeline: Pipeline
    circuit: FakeCircuitStore
    fed: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def feed(self, skip: Callable[[int], bool] = lambda i: False) -> list[Consumed]:
        """Hand the pipeline every record published since the last feed (on partition 0 of
        their lane's topic), except those `skip` names by their index (on another partition,
        which another worker owns)."""
        copies = []
        for i, (topic, key, value, headers) in enumerate(self.broker.records[self.fed :]):
            if skip(self.fed + i):
                continue
            partition = (topic, 0)
            if partition not in self.offsets:
                self.offsets[partition] = 0
                self.pipeline.assign(partition, 0)
            offset = self.offsets[partition]
            self.offsets[partition] += 1
            copies.append(Consumed(topic, 0, offset, key, value, headers))
        self.fed = len(self.broker.records)
        assert self.pipeline.accept(copies) == {}
        return copies

    def state(self, message_id: str) -> MessageState:
        return self.ledger.rows[message_id].state

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        await wait_for(condition, timeout, every=0.01)


BREAKER = BreakerConfig(failures=50, window_s=30.0, probe_interval_s=0.2)


def make_breaker(store: FakeCircuitStore, config: BreakerConfig = BREAKER) -> Breaker:
    return Breaker(
        store,
        config,
        owner="unit-worker",
        probe_lease_s=2.0,
        announced_outage_s=5.0,
        refresh_s=0.05,
        margin_s=0.0,
    )


def make_pipeline(
    ledger: FakeLedger,
    upstream: FakeUpstream,
    policy: Policy = POLICY,
    lease_s: float = 10.0,
    breaker: Breaker | None = None,
) -> Pipeline:
    return Pipeline(
        ledger=ledger,
        upstream=upstream,
        token_errors=(FakeUpstream.Unavailable,),
        policy=policy,
        signing_keys=dict([KEY]),
        slots=LaneSlots(4, 0.5),
        lanes=LANES,
        lease_s=lease_s,
        upstream_timeout_s=1.0,
        actor=Actor("worker", "unit-worker"),
        breaker=breaker or make_breaker(FakeCircuitStore()),
    )


async def harness_with(
    policy: Policy, breaker_config: BreakerConfig = BREAKER
) -> AsyncIterator[Harness]:
    ledger, broker, circuit = (
        FakeLedger(sequencing=policy.sequencing),
        FakeBroker(),
        FakeCircuitStore(),
    )
    upstream = FakeUpstream(taken())
    breaker = make_breaker(circuit, breaker_config)
    pipeline = make_pipeline(ledger, upstream, policy, breaker=breaker)
    desk = Desk(ledger, SettlementPublisher(broker, LANES, LaneSealer(KEY)))
    breaker.start()
    yield Harness(ledger, broker, upstream, desk, pipeline, circuit)
    await pipeline.stop(2.0)
    await breaker.stop()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async for harness in harness_with(POLICY):
        yield harness


@pytest.fixture
async def sequenced() -> AsyncIterator[Harness]:
    async for harness in harness_with(replace(POLICY, sequencing=Sequencing.CONTRACT)):
        yield harness


def otc(run: str, trade: str, revision: int = 1, volume: str = "400") -> dict[str, object]:
    return samples.otc_confirmation(run, f"{trade}-0000", revision=revision, volume=volume)


async def test_each_record_is_sent_once_in_contract_order_and_its_offset_passes(
    h: Harness,
) -> None:
    run = samples.run_id()
    a = await h.desk.accept([otc(run, "OTC-A", r, str(100 + r)) for r in (1, 2, 3)])
    b = await h.desk.accept([otc(run, "OTC-B")])
    h.feed()
    await h.until(lambda: all(h.ledger.settled(m) for m in a + b))
    assert {m: h.state(m) for m in a + b} == dict.fromkeys(a + b, S.DELIVERED)
    assert [m for m in h.upstream.posts if m in a] == a  # in acceptance order
    assert sorted(h.upstream.posts) == sorted(a + b)  # one POST each
    # The offset passes a record once its outcome write has returned to the chain, a step after
    # the ledger shows it settled: wait for it rather than read it in the same instant.
    await h.until(lambda: h.pipeline.offsets.commit_points() == {(LANES["standard"], 0): 4})


async def test_transient_answers_are_retried_under_one_lease_until_taken(h: Harness) -> None:
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-RETRY")])
    h.upstream.scripts[m] = [TRANSIENT, TRANSIENT, taken("TX-R")]
    h.feed()
    await h.until(lambda: h.ledger.settled(m))
    row = h.ledger.rows[m]
    assert (row.state, row.attempts, row.lease_epoch) == (S.DELIVERED, 3, 1)
    assert row.upstream_transaction_id == "TX-R"
    assert h.upstream.posts == [m, m, m]


async def test_a_record_waits_until_the_earlier_record_of_its_contract_settles(
    h: Harness,
) -> None:
    run = samples.run_id()
    first, second = await h.desk.accept(
        [otc(run, "OTC-ORDER", 1, "10"), otc(run, "OTC-ORDER", 2, "20")]
    )
    h.feed(skip=lambda i: i == 0)  # the first one's copy is somewhere else
    await never(lambda: bool(h.upstream.posts), 0.3, every=0.01)
    assert h.state(second) is S.QUEUED  # looked at, never leased
    h.ledger.rows[first].state = S.DELIVERED  # another worker delivered it
    await h.until(lambda: h.ledger.settled(second))
    assert h.upstream.posts == [second]


async def test_copies_out_of_acceptance_order_go_in_order_with_one_wait_each(h: Harness) -> None:
    # A contract's copies can reach a partition out of their acceptance order (two requests
    # accepted at once, published in the other order). A copy that waits names the record it
    # waits for; that one is tried next, not every later copy in turn.
    run = samples.run_id()
    accepted = await h.desk.accept([otc(run, "OTC-REV", r, str(10 * r)) for r in range(1, 13)])
    h.broker.records.reverse()
    h.feed()
    await h.until(lambda: all(h.ledger.settled(m) for m in accepted))
    assert h.upstream.posts == accepted
    assert len(h.ledger.claimed) <= 2 * len(accepted)  # was 6 claims a record


async def test_a_copy_waiting_for_one_not_consumed_yet_holds_its_chain_still(h: Harness) -> None:
    run = samples.run_id()
    first, second, third = await h.desk.accept(
        [otc(run, "OTC-LATE", r, str(10 * r)) for r in (1, 2, 3)]
    )
    h.feed(skip=lambda i: i == 0)  # the first one's copy is published later
    await h.until(lambda: h.ledger.claimed.count(second) >= 2)
    assert third not in h.ledger.claimed  # it would only have waited behind `first` too
    h.broker.records.append(h.broker.records[0])  # `first` arrives
    h.feed()
    await h.until(lambda: all(h.ledger.settled(m) for m in (first, second, third)))
    assert h.upstream.posts == [first, second, third]


async def test_copies_that_keep_waiting_for_a_record_not_here_name_their_contract(
    h: Harness,
) -> None:
    """What housekeeping publishes again while the lanes are unsettled: the earlier record's
    copy may be gone with a lost log, and its contract's later copies would wait for ever."""
    run = samples.run_id()
    first, second, third = await h.desk.accept(
        [otc(run, "OTC-GONE", r, str(10 * r)) for r in (1, 2, 3)]
    )
    h.feed(skip=lambda i: i == 0)  # the first one's copy is not on the broker
    await h.until(lambda: h.ledger.claimed.count(second) >= 2)
    contract = (h.desk.desk, "OTC-GONE-0000", LANES["standard"])
    assert h.pipeline.waiting_on_absent(0.0) == {contract: {second, third}}
    assert h.pipeline.waiting_on_absent(60.0) == {}  # not waited that long
    h.broker.records.append(h.broker.records[0])  # published again
    h.feed()
    await h.until(lambda: all(h.ledger.settled(m) for m in (first, second, third)))
    assert h.upstream.posts == [first, second, third]
    assert h.pipeline.waiting_on_absent(0.0) == {}


async def test_a_contract_on_both_lanes_steps_from_lane_to_lane_without_a_back_off(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One contract, real-time prices (priority lane) and other records (standard lane) in
    # turn: each record waits for the one before it on the other lane. The back-off of a wait
    # is made far longer than the test's bound: the chain waiting must be woken by the other
    # chain settling the record it waits for, not find it by polling.
    monkeypatch.setattr("workers.pipeline.WAIT_BASE_S", 30.0)
    monkeypatch.setattr("workers.pipeline.WAIT_CAP_S", 60.0)
    run, contract = samples.run_id(), "MIX-LANES-0001"
    records = []
    for hour in range(6):
        if hour % 2 == 0:
            records.append(samples.canonical(run, contract, hour=hour))
        else:
            bilateral = samples.otc_confirmation(run, contract)
            bilateral["delivery_start"] = f"2026-11-27T{hour:02d}:00:00Z"
            bilateral["delivery_end"] = f"2026-11-27T{hour:02d}:30:00Z"
            records.append(bilateral)
    accepted = await h.desk.accept(records)
    topics = [topic for topic, _, _, _ in h.broker.records]
    assert topics == [LANES["priority"], LANES["standard"]] * 3
    # The standard lane's copies first: the second record waits behind the first.
    h.feed(skip=lambda i: topics[i] == LANES["priority"])
    await h.until(lambda: accepted[1] in h.ledger.claimed)
    h.broker.records += [r for r in h.broker.records if r[0] == LANES["priority"]]
    h.feed()
    await h.until(lambda: all(h.ledger.settled(m) for m in accepted), timeout=10.0)
    assert h.upstream.posts == accepted  # in acceptance order, across the lanes
    assert len(h.ledger.claimed) <= 2 * len(accepted)


async def test_a_revision_below_one_taken_is_superseded_without_a_post(h: Harness) -> None:
    run = samples.run_id()
    [newer] = await h.desk.accept([otc(run, "OTC-SUP", 2, "20")])
    [older] = await h.desk.accept([otc(run, "OTC-SUP", 1, "10")])
    h.feed()
    await h.until(lambda: h.ledger.settled(newer) and h.ledger.settled(older))
    assert (h.state(newer), h.state(older)) == (S.DELIVERED, S.SUPERSEDED)
    assert h.upstream.posts == [newer]


async def test_a_rejected_record_is_dead_lettered_and_the_contract_moves_on(h: Harness) -> None:
    run = samples.run_id()
    bad, good = await h.desk.accept([otc(run, "OTC-REJ", 1, "1"), otc(run, "OTC-REJ", 2, "2")])
    h.upstream.scripts[bad] = [Answer(AnswerKind.REJECTED, 422, "422: unknown counterparty")]
    h.feed()
    await h.until(lambda: h.ledger.settled(bad) and h.ledger.settled(good))
    assert (h.state(bad), h.state(good)) == (S.DEAD_LETTERED, S.DELIVERED)
    [dead] = h.ledger.dead_letters.values()
    assert (dead.reason, dead.error_status, dead.attempts) == (
        DeadLetterReason.UPSTREAM_REJECTED,
        422,
        1,
    )
    assert h.upstream.posts == [bad, good]


async def test_with_contract_sequencing_the_next_record_parks_behind_the_dead_letter(
    sequenced: Harness,
) -> None:
    h = sequenced
    run = samples.run_id()
    bad, behind = await h.desk.accept([otc(run, "OTC-SEQ", 1, "1"), otc(run, "OTC-SEQ", 2, "2")])
    h.upstream.scripts[bad] = [Answer(AnswerKind.REJECTED, 422, "422: no")]
    h.feed()
    await h.until(lambda: h.state(behind) is S.PARKED)
    assert h.ledger.rows[behind].parked_behind == bad
    assert h.upstream.posts == [bad]


async def test_a_drifted_position_is_held_for_an_analyst(h: Harness) -> None:
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-DRIFT", volume="400")])
    h.upstream.scripts[m] = [taken("TX-D", position="-999.000", status=200)]
    h.feed()
    await h.until(lambda: h.ledger.settled(m))
    assert h.state(m) is S.HELD
    [hold] = h.ledger.holds
    assert getattr(hold, "reconciled") == Decimal("-999.000")  # noqa: B009


async def test_an_untrusted_copy_is_dead_lettered_and_does_not_hold_the_partition(
    h: Harness,
) -> None:
    run = samples.run_id()
    [forged, good] = await h.desk.accept([otc(run, "OTC-F1"), otc(run, "OTC-F2")])
    topic, key, value, headers = h.broker.records[0]
    h.broker.records[0] = (topic, key, value.replace(b"400", b"401"), headers)
    h.feed()
    await h.until(lambda: h.ledger.settled(good) and bool(h.ledger.dead_letters))
    [dead] = h.ledger.dead_letters.values()
    assert dead.reason is DeadLetterReason.INVALID_SIGNATURE
    assert h.state(forged) is S.QUEUED  # the real copy is still to come
    assert h.upstream.posts == [good]
    await h.until(lambda: h.pipeline.offsets.commit_points() == {(LANES["standard"], 0): 2})


async def test_a_signed_copy_no_request_accepted_is_a_dead_letter_never_a_post(
    h: Harness,
) -> None:
    run = samples.run_id()
    record = h.desk.canonical(otc(run, "OTC-GHOST"))
    from schemas.envelope import envelope_for

    envelope = envelope_for("power-east", record)
    await h.desk.publisher.publish(
        [envelope], desk="power-east", trader="t", trace_id="t", batch_id="batch_never"
    )
    h.feed()
    await h.until(lambda: bool(h.ledger.dead_letters))
    [dead] = h.ledger.dead_letters.values()
    assert dead.reason is DeadLetterReason.INVALID_MESSAGE
    assert h.upstream.posts == []


async def test_a_lease_lost_mid_post_is_not_written_and_the_copy_waits_for_the_new_owner(
    h: Harness,
) -> None:
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-LEASE")])
    h.upstream.gate = asyncio.Event()
    h.feed()
    await h.until(lambda: h.upstream.posts == [m])
    # This worker froze past its lease; another one claimed the record (epoch 2).
    h.ledger.now += 60
    row = h.ledger.rows[m]
    [other] = await h.ledger.claim([ClaimRequest(m, row.publication, 0, 0)])
    assert other.epoch == 2
    h.upstream.gate.set()
    # The answer is not written over the new owner's lease, and the offset must not pass.
    await never(
        lambda: row.state is not S.DELIVERING or bool(h.pipeline.offsets.commit_points()),
        0.3,
        every=0.01,
    )
    assert (row.lease_epoch, row.upstream_transaction_id) == (2, None)
    # The new owner settles it; the old copy then finishes without another POST.
    await h.ledger.write([Outcome(m, 2, S.DELIVERED, 2, 0.0, upstream_transaction_id="TX-2")])
    await h.until(lambda: h.pipeline.offsets.commit_points() == {(LANES["standard"], 0): 1})
    assert h.upstream.posts == [m]


async def test_an_answer_received_after_revocation_is_still_written(h: Harness) -> None:
    """Issue #6 case 2: the partition moves while a POST is in flight; the answer is kept,
    and nothing is committed for the partition this worker no longer owns."""
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-REVOKE")])
    h.upstream.gate = asyncio.Event()
    h.feed()
    await h.until(lambda: h.upstream.posts == [m])
    h.pipeline.revoke([(LANES["standard"], 0)])
    h.upstream.gate.set()
    await h.until(lambda: h.ledger.settled(m))
    assert h.state(m) is S.DELIVERED
    assert h.pipeline.offsets.commit_points() == {}
    assert h.upstream.posts == [m]


async def test_a_401_renews_the_token_once(h: Harness) -> None:
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-401")])
    h.upstream.scripts[m] = [Answer(AnswerKind.UNAUTHORIZED, 401, "401: expired"), taken()]
    h.feed()
    await h.until(lambda: h.ledger.settled(m))
    assert h.state(m) is S.DELIVERED
    assert h.upstream.posts == [m, m]


async def test_no_token_spends_time_but_sends_nothing(h: Harness) -> None:
    h.pipeline.policy = replace(POLICY, budget_s=0.2)
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-NOTOKEN")])
    h.upstream.token_down = True
    h.feed()
    await h.until(lambda: h.ledger.settled(m))
    [dead] = h.ledger.dead_letters.values()
    assert dead.reason is DeadLetterReason.TOKEN_UNAVAILABLE
    assert h.upstream.posts == []


async def test_an_answer_is_kept_while_the_database_is_away_and_written_when_back(
    h: Harness,
) -> None:
    run = samples.run_id()
    [m] = await h.desk.accept([otc(run, "OTC-DBAWAY")])
    h.upstream.gate = asyncio.Event()
    h.feed()
    await h.until(lambda: h.upstream.posts == [m])
    h.ledger.away = True
    h.upstream.gate.set()
    await never(lambda: h.state(m) is not S.DELIVERING, 0.3, every=0.01)
    h.ledger.away = False
    await h.until(lambda: h.ledger.settled(m))
    assert h.state(m) is S.DELIVERED
    assert h.upstream.posts == [m]


def test_database_away_is_recognised_as_such() -> None:
    from ledger.db import database_unavailable

    assert database_unavailable(DatabaseAway())


# -- the upstream away (issue #8): the breaker and maintenance windows ----------------------

OUTAGE = Answer(AnswerKind.TRANSIENT, 503, "503: down")
FAST_BREAKER = BreakerConfig(failures=3, window_s=30.0, probe_interval_s=0.2)


@pytest.fixture
async def fragile() -> AsyncIterator[Harness]:
    """A record's budget is 0.5 s; the breaker opens after 3 failures in a row."""
    async for harness in harness_with(replace(POLICY, budget_s=0.5), FAST_BREAKER):
        yield harness


async def test_an_outage_longer_than_the_budget_dead_letters_nothing(fragile: Harness) -> None:
    h = fragile
    run = samples.run_id()
    ids = await h.desk.accept([otc(run, f"OTC-OUT{i}") for i in range(8)])
    h.upstream.down = OUTAGE
    h.feed()
    await h.until(lambda: h.circuit.circuit.state is not CircuitState.CLOSED)
    # Three times the records' budget: only probes go out, one per interval, none charged.
    await asyncio.sleep(1.5)
    assert h.ledger.dead_letters == {}
    assert {h.state(m) for m in ids} <= {S.QUEUED, S.DELIVERING}
    probes = [e for e in h.circuit.events if isinstance(e, TakeProbe)]
    assert 1 <= len(probes) <= 1.5 / FAST_BREAKER.probe_interval_s + 1
    assert len(h.upstream.posts) <= FAST_BREAKER.failures + 8 + len(probes)
    h.upstream.down = None
    await h.until(lambda: all(h.ledger.settled(m) for m in ids))
    assert {h.state(m) for m in ids} == {S.DELIVERED}
    assert h.ledger.dead_letters == {}
    assert h.circuit.circuit.state is CircuitState.CLOSED


async def test_a_failing_probe_opens_again_and_a_good_one_closes(fragile: Harness) -> None:
    h = fragile
    run = samples.run_id()
    ids = await h.desk.accept([otc(run, f"OTC-PRB{i}") for i in range(4)])
    h.upstream.down = OUTAGE
    h.feed()
    await h.until(lambda: sum(isinstance(e, Failed) and e.probe for e in h.circuit.events) >= 2)
    assert h.circuit.circuit.state in (CircuitState.OPEN, CircuitState.HALF_OPEN)
    h.upstream.down = None
    await h.until(lambda: h.circuit.circuit.state is CircuitState.CLOSED)
    assert any(isinstance(e, Succeeded) and e.probe for e in h.circuit.events)
    await h.until(lambda: all(h.ledger.settled(m) for m in ids))
    assert h.ledger.dead_letters == {}


async def test_nothing_is_sent_inside_a_maintenance_window(h: Harness) -> None:
    run = samples.run_id()
    now = datetime.now(UTC)
    h.circuit.windows.append(
        MaintenanceWindow("mw_1", now, now + timedelta(seconds=0.6), "patching", "op", now)
    )
    await h.pipeline.breaker.refresh()
    ids = await h.desk.accept([otc(run, "OTC-MW1"), samples.canonical(run, "RT-MW-000001")])
    h.feed()
    await never(lambda: bool(h.upstream.posts), 0.4, every=0.01)
    assert {h.state(m) for m in ids} == {S.QUEUED}  # never even claimed
    await h.until(lambda: all(h.ledger.settled(m) for m in ids))


async def test_a_503_announcing_maintenance_opens_the_breaker_until_then(h: Harness) -> None:
    h.pipeline.breaker.announced_outage_s = 0.3
    run = samples.run_id()
    [first, *rest] = await h.desk.accept([otc(run, f"OTC-ANN{i}") for i in range(4)])
    h.upstream.scripts[first] = [
        Answer(AnswerKind.TRANSIENT, 503, "503: maintenance", retry_after_s=0.5),
        taken(),
    ]
    h.upstream.gate = asyncio.Event()
    h.feed()
    await h.until(lambda: len(h.upstream.posts) == 4)
    h.upstream.gate.set()
    await h.until(lambda: h.circuit.circuit.state is not CircuitState.CLOSED)
    assert h.circuit.circuit.reason == "announced"
    await h.until(lambda: all(h.ledger.settled(m) for m in [first, *rest]))
    row = h.ledger.rows[first]
    assert (row.state, row.attempts) == (S.DELIVERED, 1)  # the announced 503 was not charged


async def test_two_workers_sharing_one_breaker_send_one_probe_at_a_time(
    fragile: Harness,
) -> None:
    h = fragile
    other_breaker = make_breaker(h.circuit, FAST_BREAKER)
    other_breaker.owner = "unit-worker-2"
    other = make_pipeline(
        h.ledger, h.upstream, replace(POLICY, budget_s=0.5), breaker=other_breaker
    )
    other_breaker.start()
    try:
        run = samples.run_id()
        ids = await h.desk.accept([otc(run, f"OTC-TWO{i}") for i in range(12)])
        h.upstream.down = OUTAGE
        copies = h.feed()
        # The second worker holds copies of its own (another partition) of the same records.
        other.assign(("unit.standard", 1), 0)
        other.accept([replace(c, partition=1) for c in copies])
        await h.until(lambda: h.circuit.circuit.state is not CircuitState.CLOSED)
        started = len(h.upstream.posts)
        await asyncio.sleep(1.0)
        probes = [e for e in h.circuit.events if isinstance(e, TakeProbe)]
        owners = {e.owner for e in probes}
        sent = len(h.upstream.posts) - started
        assert sent <= 1.0 / FAST_BREAKER.probe_interval_s + 2  # one probe per interval
        assert owners  # someone probed
        h.upstream.down = None
        await h.until(lambda: all(h.ledger.settled(m) for m in ids))
        assert h.ledger.dead_letters == {}
        assert sorted(set(h.upstream.posts) & set(ids)) == sorted(ids)
    finally:
        await other.stop(2.0)
        await other_breaker.stop()


async def test_records_handed_over_before_their_assignment_is_recorded_are_kept_for_a_reread(
    h: Harness,
) -> None:
    """The fetcher may hand over a partition's records while the rebalance callback is still
    looking up positions: they are not tracked (no generation yet) and must be read again —
    never dropped with the consumer's position already past them."""
    run = samples.run_id()
    [message_id] = await h.desk.accept([otc(run, "OTC-EARLY")])
    topic, key, value, headers = h.broker.records[-1]
    early = Consumed(topic, 3, 41, key, value, headers)
    assert h.pipeline.accept([early]) == {}
    assert h.pipeline.untracked == {(topic, 3): 41}
    assert h.upstream.posts == []
    h.pipeline.assign((topic, 3), 41)  # the callback records the generation
    assert h.pipeline.accept([early]) == {}
    assert h.pipeline.untracked == {}
    await h.until(lambda: h.upstream.posts == [message_id])
