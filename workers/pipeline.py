"""The delivery pipeline: consumed copies in, settled records out — the I/O shell around the
decision core (workers.core).

Rules kept here:
- a copy's offset becomes committable only when nothing more will happen to it at that point
  of the partition: its record settled (state written, under our lease), or the copy is stale,
  or it belongs to a request that was never accepted — never while its record is in flight;
- copies are parsed and tracked without waiting on anything, in the order the consumer gave
  them; any header bytes, any value, end in a defined state (a dead letter at worst);
- one contract's copies go through one chain, one at a time; different contracts run
  concurrently and hold a delivery slot only for the POST itself; a copy that must wait (an
  earlier record of its contract unsettled elsewhere, a lease held by another worker) steps
  aside for the next copies of its chain — the ledger, not the chain, enforces the order;
- every write about a record names the lease it holds; a write refused because the lease was
  taken over means the record is someone else's now: the copy waits until it is settled;
- when its partition is revoked, a chain stops at its next safe point (after an answer is
  written, or in a wait) and releases the lease it holds, so the new owner need not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

import orjson
import structlog
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from ledger.crypto import PayloadCipher, open_lane_value
from ledger.rows import (
    Actor,
    AuditEvent,
    ClaimRequest,
    ClaimRow,
    DeadLetterRow,
    HoldRow,
    LateTaken,
    Outcome,
)
from runtime import tracing
from runtime.aio import first_of, stop_tasks
from schemas.envelope import header_map, message_id_for, publication_of, verify_message
from schemas.records import CanonicalRecord
from schemas.states import DeadLetterReason, MessageState
from schemas.text import cap_text
from workers import metrics
from workers.batching import BadItem, GroupCommitter
from workers.breaker import Admission, Breaker, Health
from workers.core import (
    AbortExpired,
    DeadLetter,
    Exhausted,
    Finish,
    NotAccepted,
    Park,
    Policy,
    Progress,
    Retry,
    Send,
    Settle,
    Supersede,
    Wait,
    decide_answer,
    decide_claim,
    decide_token_failure,
)
from workers.offsets import OffsetTracker, PartitionKey, Ticket, Untracked
from workers.rules import Answer, AnswerKind
from workers.slots import LaneSlots

log = structlog.get_logger("etrm.worker")

# A POST starts only with at least this much lease left beyond the upstream timeout.
LEASE_MARGIN_S = 2.0
WAIT_BASE_S = 0.05
WAIT_CAP_S = 1.0
# A copy that waits for the same earlier record again within this long has waited all along;
# a longer gap (the chain held by the breaker or a maintenance window) starts its wait afresh.
WAITING_GAP_S = 5 * WAIT_CAP_S
LOOKAHEAD = 8


class ConsumedRecord(Protocol):
    """The parts of an aiokafka ConsumerRecord a worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]
    timestamp: int  # ms since the epoch: the intake's publish, just before its 202


class DeliveryLedger(Protocol):
    async def claim(self, requests: Sequence[ClaimRequest]) -> list[ClaimRow]: ...
    async def write(self, outcomes: Sequence[Outcome]) -> list[bool]: ...
    async def record_untrusted(self, rows: Sequence[DeadLetterRow]) -> list[None]: ...
    async def record_late_taken(self, late: LateTaken) -> bool: ...
    async def sweep_expired(self) -> int: ...


class Upstream(Protocol):
    async def token(self) -> str: ...
    async def renew(self, stale: str) -> None: ...
    async def post(self, body: bytes, message_id: str, trace_id: str, token: str) -> Answer: ...


@dataclass(slots=True)
class Copy:
    """One consumed copy of a record, on its way to being settled."""

    record: ConsumedRecord
    ticket: Ticket
    lane: str
    message_id: str
    publication: str | None
    desk: str
    trader: str
    trace_id: str
    contract_id: str
    settlement_run_id: str | None
    position: Decimal
    value: bytes = b""  # the canonical record (opened, when the lane carries it sealed)
    problem: str | None = None  # signed by the intake, yet not a canonical record
    not_before: float = 0.0
    waits: int = 0
    behind: str | None = None  # of its last wait: the earlier record it waited for
    # The earlier record it has been waiting for, wait after wait, since when and when it
    # last waited (monotonic).
    waiting_for: str | None = None
    waiting_since: float = 0.0
    waited_at: float = 0.0


@dataclass(eq=False)
class Chain:
    key: tuple[str, int, str]
    items: deque[Copy] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # Where the last wait points: an earlier record in this chain to try next (`front`), or
    # one not here yet (`behind`) — nothing else is tried until it arrives or `behind_until`.
    front: Copy | None = None
    behind: str | None = None
    behind_until: float = 0.0

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    def find(self, message_id: str) -> Copy | None:
        return next((c for c in self.items if c.message_id == message_id), None)

    def look_again(self) -> None:
        """What waited here most likely waited for a record just settled: every copy is
        tried again now rather than at the end of its back-off."""
        for waiting in self.items:
            waiting.not_before = 0.0
        self.front, self.behind = None, None

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the chain is stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self.stopped.wait()


class _Lost(Exception):
    """The lease was taken over (or released): the record is not ours any more."""


class Pipeline:
    def __init__(
        self,
        *,
        ledger: DeliveryLedger,
        upstream: Upstream,
        token_errors: tuple[type[Exception], ...],
        policy: Policy,
        signing_keys: dict[str, bytes],
        slots: LaneSlots,
        lanes: dict[str, str],
        lease_s: float,
        upstream_timeout_s: float,
        actor: Actor,
        breaker: Breaker,
        rng: random.Random | None = None,
        lane_cipher: PayloadCipher | None = None,
    ) -> None:
        self.ledger = ledger
        self.lane_cipher = lane_cipher  # opens values sealed on the lanes
        self.breaker = breaker
        self.upstream = upstream
        self.token_errors = token_errors
        self.policy = policy
        self.keys = signing_keys
        self.slots = slots
        self.lane_of_topic = {topic: lane for lane, topic in lanes.items()}
        self.lease_s = lease_s
        self.upstream_timeout_s = upstream_timeout_s
        self.actor = actor
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self.offsets = OffsetTracker()
        self.chains: dict[tuple[str, int, str], Chain] = {}
        # The same chains by contract: one contract has a chain per lane (and partition) it
        # has records on, and one of them may wait for a record the other is settling.
        self.by_contract: dict[str, dict[tuple[str, int, str], Chain]] = {}
        self.claims: GroupCommitter[ClaimRequest, ClaimRow] = GroupCommitter("claims", ledger.claim)
        self.writes: GroupCommitter[Outcome, bool] = GroupCommitter("outcomes", ledger.write)
        self.untrusted: GroupCommitter[DeadLetterRow, None] = GroupCommitter(
            "dead_letters", ledger.record_untrusted
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.settled = asyncio.Event()  # set whenever a copy finishes (back-pressure)
        self.untracked: dict[PartitionKey, int] = {}  # of the last poll: see accept()

    # -- the consumer's side -------------------------------------------------------------------

    def assign(self, partition: PartitionKey, position: int) -> None:
        self.offsets.assign(partition, position)

    def revoke(self, partitions: Iterable[PartitionKey]) -> None:
        gone = set(partitions)
        self.offsets.revoke(gone)
        for key, chain in list(self.chains.items()):
            if (key[0], key[1]) in gone:
                chain.stopped.set()
                self._forget(chain)

    def accept(self, records: Sequence[ConsumedRecord]) -> dict[PartitionKey, int]:
        """Track and route one poll; returns partitions to seek back (a gap was seen).
        Records of partitions not (yet) assigned here are left in `self.untracked` (first
        offset per partition): the caller seeks back to them when its consumer does hold the
        partition — records handed over before the assignment was recorded are read again,
        never dropped."""
        seeks: dict[PartitionKey, int] = {}
        self.untracked = {}
        for record in records:
            partition = (record.topic, record.partition)
            if partition in seeks or partition in self.untracked:
                continue
            ticket = self.offsets.track(partition, record.offset)
            if ticket is Untracked.GAP:
                expected = self.offsets.expected(partition)
                if expected is not None:
                    seeks[partition] = expected
                continue
            if ticket is Untracked.STALE:
                self.untracked[partition] = record.offset
                continue
            if not isinstance(ticket, Ticket):
                continue
            copy = self._parse(record, ticket)
            if copy is not None:
                self._route(copy)
        return seeks

    def _route(self, copy: Copy) -> None:
        key = (copy.record.topic, copy.record.partition, copy.contract_id)
        chain = self.chains.get(key)
        if chain is None:
            chain = self.chains[key] = Chain(key)
            self.by_contract.setdefault(copy.contract_id, {})[key] = chain
        chain.items.append(copy)
        chain.arrived.set()
        if chain.task is None or chain.task.done():
            chain.task = asyncio.create_task(self._run_chain(chain), name=f"chain-{key}")
            self.tasks.add(chain.task)
            chain.task.add_done_callback(self.tasks.discard)

    def _finish(self, ticket: Ticket) -> None:
        self.offsets.finish(ticket)
        self.settled.set()

    # -- parsing and trust -----------------------------------------------------------------------

    def _parse(self, record: ConsumedRecord, ticket: Ticket) -> Copy | None:
        headers = header_map(record.headers)
        value = record.value or b""
        lane = self.lane_of_topic.get(record.topic, "standard")
        problem = verify_message(value, headers, self.keys)
        if problem is not None:
            self._dead_letter_untrusted(
                record, ticket, DeadLetterReason.INVALID_SIGNATURE, problem, headers
            )
            return None
        opened = open_lane_value(value, headers, self.lane_cipher)
        if isinstance(opened, str):
            self._dead_letter_untrusted(
                record, ticket, DeadLetterReason.INVALID_MESSAGE, opened, headers
            )
            return None
        value = opened
        desk = headers["desk"]
        copy = Copy(
            record=record,
            ticket=ticket,
            lane=lane,
            message_id=headers["message_id"],
            publication=publication_of(headers),
            desk=desk,
            trader=headers["trader"],
            trace_id=headers["trace_id"],
            contract_id=(record.key or b"").decode("utf-8", "backslashreplace")[:64],
            settlement_run_id=None,
            position=Decimal(0),
            value=value,
        )
        try:
            canonical = CanonicalRecord.model_validate(orjson.loads(value))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            copy.problem = f"not a canonical settlement record: {type(exc).__name__}"
            return copy
        if message_id_for(desk, value) != copy.message_id:
            self._dead_letter_untrusted(
                record,
                ticket,
                DeadLetterReason.INVALID_MESSAGE,
                "message_id does not match the record",
                headers,
            )
            return None
        copy.contract_id = canonical.contract_id
        copy.settlement_run_id = canonical.settlement_run_id
        copy.position = canonical.position_mwh
        return copy

    def _dead_letter_untrusted(
        self,
        record: ConsumedRecord,
        ticket: Ticket,
        reason: DeadLetterReason,
        problem: str,
        headers: dict[str, str],
    ) -> None:
        digest = hashlib.sha256(record.value or b"")
        for name, raw in record.headers:
            digest.update(name.encode("utf-8", "backslashreplace") + b"\0" + (raw or b"") + b"\0")
        row = dead_letter_row(
            record,
            dedupe_key=f"copy:{record.topic}:{record.partition}:{record.offset}:"
            f"{digest.hexdigest()[:32]}",
            reason=reason,
            error=problem,
            message_id=cap_text(headers.get("message_id", ""), 64) or None,
            desk=cap_text(headers.get("desk", ""), 64) or None,
        )
        metrics.DEAD_LETTERS.labels(reason).inc()
        log.warning(
            "message_rejected",
            reason=str(reason),
            problem=cap_text(problem, 200),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        self._track_write(self.untrusted.submit(row), ticket)

    def _track_write(self, future: asyncio.Future[None], ticket: Ticket) -> None:
        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved: a refused row was logged by the committer
                # A dead letter the database refused for its bytes is logged by the committer;
                # its copy must not hold the partition back forever.
                self._finish(ticket)

        future.add_done_callback(done)

    # -- one contract's chain --------------------------------------------------------------------

    async def _run_chain(self, chain: Chain) -> None:
        while chain.items and not chain.stopping:
            copy = self._next_ready(chain)
            if copy is None:
                wake_at = (
                    chain.behind_until
                    if chain.behind is not None
                    else min(c.not_before for c in list(chain.items)[: LOOKAHEAD + 1])
                )
                chain.arrived.clear()
                if wake_at > time.monotonic():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wake_at - time.monotonic()):
                            await first_of(chain.arrived.wait(), chain.stopped.wait())
                continue
            if not self.offsets.current(copy.ticket):
                chain.items.remove(copy)
                continue
            # The upstream away or in maintenance: wait here, touching nothing.
            reserved = await self.breaker.wait_turn(chain.stopped)
            if reserved is None:
                break
            try:
                finished = await self._deliver(copy, chain, reserved)
            except BadItem:
                finished = False
            except Exception:  # never let one copy kill its contract's chain
                log.exception("delivery_step_failed", message_id=copy.message_id)
                finished = False
            finally:
                if reserved:
                    self.breaker.release()
            if finished:
                chain.items.remove(copy)
                self._finish(copy.ticket)
                # Copies of one contract can reach the partition out of their acceptance order.
                chain.look_again()
                self._wake_behind(copy)
            else:
                copy.waits += 1
                now = time.monotonic()
                copy.not_before = now + _wait_delay(copy.waits, self.rng)
                if copy.behind != copy.waiting_for or now - copy.waited_at > WAITING_GAP_S:
                    copy.waiting_for, copy.waiting_since = copy.behind, now
                copy.waited_at = now
                self._wait_behind(chain, copy)
        if self.chains.get(chain.key) is chain and not chain.items:
            self._forget(chain)

    def _forget(self, chain: Chain) -> None:
        del self.chains[chain.key]
        contract = chain.key[2]
        same = self.by_contract.get(contract, {})
        if same.get(chain.key) is chain:
            del same[chain.key]
            if not same:
                del self.by_contract[contract]

    def waiting_on_absent(self, longer_than_s: float) -> dict[tuple[str, str, str], set[str]]:
        """(desk, contract, lane topic) of every copy here that has waited longer than
        `longer_than_s` for an earlier record of its contract that this worker does not hold,
        with the records of that contract it does hold. The record waited for may be queued
        behind a backlog on the other lane — or its copy may be gone with a lost log, and then
        nothing but publishing it again moves the contract: its later copies are never
        committed past, so the lanes never read as settled (housekeeping's restore). On the
        copy's own lane it is not behind anything: one contract's records share a partition,
        and this worker has read it up to the copy (unless two requests were accepted at once
        and published in the other order: then a copy published again is one more copy,
        which the ledger delivers once)."""
        now = time.monotonic()
        copies = [c for chain in self.chains.values() for c in chain.items]
        held = {c.message_id for c in copies}
        waiting = {
            (c.desk, c.contract_id, c.record.topic)
            for c in copies
            if c.waiting_for is not None
            and c.waiting_for not in held
            and now - c.waiting_since >= longer_than_s
            and now - c.waited_at <= WAITING_GAP_S  # still trying: not held by the breaker
        }
        if not waiting:
            return {}
        held_of: dict[tuple[str, str], set[str]] = {key[:2]: set() for key in waiting}
        for c in copies:
            if (ids := held_of.get((c.desk, c.contract_id))) is not None:
                ids.add(c.message_id)
        return {key: set(held_of[key[:2]]) for key in waiting}

    def _wake_behind(self, settled: Copy) -> None:
        """A chain of the same contract on another lane (or partition) that waits for
        `settled` looks again now, not at the end of its back-off: a contract with records on
        both lanes would otherwise take a back-off at each step from one lane to the other."""
        for other in self.by_contract.get(settled.contract_id, {}).values():
            if other.behind == settled.message_id:
                other.look_again()
                other.arrived.set()

    @staticmethod
    def _wait_behind(chain: Chain, copy: Copy) -> None:
        """After `copy` waited: if it waits for a record of this chain, that one goes next;
        if for one not consumed yet (published later, or still being accepted), the chain tries
        nothing until it arrives or `copy`'s back-off ends — the later copies would only wait
        behind it too, each with a claim of its own."""
        behind, copy.behind = copy.behind, None
        if behind is None:
            return
        ahead = chain.find(behind)
        if ahead is not None:
            ahead.not_before = 0.0
            chain.front = ahead
        else:
            chain.behind, chain.behind_until = behind, copy.not_before

    @staticmethod
    def _next_ready(chain: Chain) -> Copy | None:
        now = time.monotonic()
        front, chain.front = chain.front, None
        if front is not None and any(c is front for c in chain.items):
            return front
        if chain.behind is not None:
            arrived = chain.find(chain.behind)
            if arrived is None and now < chain.behind_until:
                return None
            chain.behind = None
            if arrived is not None:
                return arrived
        for i, copy in enumerate(chain.items):
            if copy.not_before <= now:
                return copy
            if i >= LOOKAHEAD:
                return None
        return None

    async def _deliver(self, copy: Copy, chain: Chain, probe_reserved: bool = False) -> bool:
        """One step for one copy: True when it is settled for good (its offset may pass).
        `probe_reserved`: the breaker is open and this chain may send the group's probe."""
        row = await self.claims.submit(
            ClaimRequest(
                copy.message_id, copy.publication, copy.record.partition, copy.record.offset
            )
        )
        verdict = decide_claim(row, self.policy)
        if copy.problem is not None and isinstance(verdict, Send | Supersede | Park | Exhausted):
            # Signed by our intake, accepted, and yet not a record we can send.
            assert row.epoch is not None
            return await self._dead_letter(
                copy,
                row.epoch,
                row.attempts,
                row.budget_used_s,
                DeadLetter(DeadLetterReason.INVALID_MESSAGE, None, copy.problem),
            )
        match verdict:
            case Finish():
                return True
            case NotAccepted(detail=detail):
                future = self.untrusted.submit(self._not_accepted_row(copy, detail))
                with contextlib.suppress(BadItem):
                    await future
                return True
            case AbortExpired():
                await self.ledger.sweep_expired()
                return False
            case Wait(release=release, why=why, behind=behind):
                copy.behind = behind
                if release and row.epoch is not None:
                    await self._write(
                        copy,
                        Outcome(
                            copy.message_id,
                            row.epoch,
                            MessageState.QUEUED,
                            row.attempts,
                            row.budget_used_s,
                        ),
                    )
                log.debug("delivery_waits", message_id=copy.message_id, why=why)
                return False
            case Supersede(detail=detail):
                assert row.epoch is not None
                return await self._settle_without_post(copy, row, MessageState.SUPERSEDED, detail)
            case Park(blocker=blocker, detail=detail):
                assert row.epoch is not None
                return await self._settle_without_post(
                    copy, row, MessageState.PARKED, detail, parked_behind=blocker
                )
            case Exhausted(detail=detail):
                assert row.epoch is not None
                return await self._dead_letter(
                    copy,
                    row.epoch,
                    row.attempts,
                    row.budget_used_s,
                    DeadLetter(DeadLetterReason.RETRIES_EXHAUSTED, None, detail),
                    row.first_attempt_at,
                )
            case Send():
                return await self._send(copy, verdict, chain, probe_reserved)
        raise AssertionError(verdict)  # pragma: no cover - every verdict is matched

    async def _settle_without_post(
        self,
        copy: Copy,
        row: ClaimRow,
        state: MessageState,
        detail: str,
        *,
        parked_behind: str | None = None,
    ) -> bool:
        assert row.epoch is not None
        outcome = Outcome(
            copy.message_id,
            row.epoch,
            state,
            row.attempts,  # the attempt this claim reserved was never sent
            row.budget_used_s,
            detail=detail,
            parked_behind=parked_behind,
            events=[self._event(copy, state, detail)],
        )
        applied = await self._write(copy, outcome)
        if applied:
            self._log_outcome(copy, state, row.attempts, detail=detail)
        return applied

    # -- sending under the lease -----------------------------------------------------------------

    async def _send(
        self, copy: Copy, send: Send, chain: Chain, probe_reserved: bool = False
    ) -> bool:
        epoch = send.epoch
        progress = Progress(send.attempts, send.budget_used_s)
        lease_ends = time.monotonic() + self.lease_s
        first_at = send.first_attempt_at
        try:
            while True:
                if chain.stopping:
                    # The partition moved on: hand the record over at once.
                    await self._hand_back(copy, epoch, progress)
                    return False
                admission = await self.breaker.admit(probe_reserved)
                if admission is Admission.HOLD:
                    # The upstream is away or in maintenance: send nothing, spend nothing.
                    metrics.HELD_BY_BREAKER.inc()
                    await self._hand_back(copy, epoch, progress)
                    return False
                probe = admission is Admission.PROBE
                if lease_ends - time.monotonic() < self.upstream_timeout_s + LEASE_MARGIN_S:
                    await self._progress(copy, epoch, progress, None)
                    lease_ends = time.monotonic() + self.lease_s
                started = time.monotonic()
                decision, token, error, health, retry_after = await self._attempt(copy, progress)
                away = await self.breaker.report(health, probe=probe, retry_after_s=retry_after)
                if probe:
                    probe_reserved = False
                    self.breaker.release()
                if away and not isinstance(decision, Settle) and health is not Health.UP:
                    # The upstream is away (this failure may have been the one that showed
                    # it): the failure is the outage's, not the record's — not charged.
                    metrics.HELD_BY_BREAKER.inc()
                    await self._hand_back(copy, epoch, progress)
                    return False
                progress = replace(
                    progress, budget_used_s=progress.budget_used_s + time.monotonic() - started
                )
                if isinstance(decision, Settle):
                    return await self._settled(copy, epoch, progress, decision, first_at)
                if isinstance(decision, DeadLetter):
                    return await self._dead_letter(
                        copy, epoch, progress.attempts, progress.budget_used_s, decision, first_at
                    )
                # Retry: write ahead the next POST (and the wait) before waiting and sending.
                if decision.renew_token and token is not None:
                    with contextlib.suppress(*self.token_errors):
                        await self.upstream.renew(token)
                    progress = replace(progress, renewed_token=True)
                sent = token is not None
                progress = replace(
                    progress,
                    attempts=progress.attempts + (1 if sent else 0),
                    budget_used_s=progress.budget_used_s + decision.delay_s,
                )
                await self._progress(copy, epoch, progress, error)
                lease_ends = time.monotonic() + self.lease_s
                await chain.pause(decision.delay_s)
        except _Lost:
            return False

    async def _attempt(
        self, copy: Copy, progress: Progress
    ) -> tuple[Retry | Settle | DeadLetter, str | None, str | None, Health, float | None]:
        """One POST (or the failure to get a token for it): the decision, the token used (None
        when no POST was sent), the error text to keep, what it showed of the upstream's
        health, and the Retry-After it asked for."""
        try:
            token = await self.upstream.token()
        except self.token_errors as exc:
            error = cap_text(str(exc))
            decision = decide_token_failure(error, progress, policy=self.policy, rng=self.rng)
            return decision, None, error, Health.DOWN, None
        async with self.slots.slot(copy.lane):
            with (
                tracing.span(
                    "kafka deliver",
                    SpanKind.CONSUMER,
                    tracing.from_headers(copy.record.headers),
                    message_id=copy.message_id,
                    attempt=progress.attempts,
                ),
                tracing.span("POST upstream", SpanKind.CLIENT) as post,
            ):
                answer = await self.upstream.post(copy.value, copy.message_id, copy.trace_id, token)
                post.set_attribute("http.response.status_code", answer.status or 0)
        decision = decide_answer(
            answer, progress, submitted=copy.position, policy=self.policy, rng=self.rng
        )
        return decision, token, answer.error or None, _health(answer), answer.retry_after_s

    async def _hand_back(self, copy: Copy, epoch: int, progress: Progress) -> None:
        """Release the lease unsent: the POST this claim reserved is not counted."""
        await self._write(
            copy,
            Outcome(
                copy.message_id,
                epoch,
                MessageState.QUEUED,
                progress.attempts - 1,
                progress.budget_used_s,
            ),
        )

    async def _progress(
        self, copy: Copy, epoch: int, progress: Progress, error: str | None
    ) -> None:
        applied = await self._write(
            copy,
            Outcome(
                copy.message_id,
                epoch,
                MessageState.DELIVERING,
                progress.attempts,
                progress.budget_used_s,
                last_error=error,
                last_attempt_at=datetime.now(UTC),
                renew_lease_s=self.lease_s,
            ),
        )
        if not applied:
            raise _Lost

    async def _settled(
        self,
        copy: Copy,
        epoch: int,
        progress: Progress,
        settle: Settle,
        first_at: datetime | None,
    ) -> bool:
        hold = None
        if settle.state is MessageState.HELD:
            hold = HoldRow(
                hold_id=new_id("hold"),
                message_id=copy.message_id,
                desk=copy.desk,
                contract_id=copy.contract_id,
                submitted=copy.position,
                reconciled=settle.reconciled,
                variance=settle.variance,
                reason=settle.hold_reason or "drift",
            )
        outcome = Outcome(
            copy.message_id,
            epoch,
            settle.state,
            progress.attempts,
            progress.budget_used_s,
            detail=settle.detail,
            upstream_transaction_id=settle.transaction_id,
            reconciled_position_mwh=settle.reconciled,
            last_attempt_at=datetime.now(UTC),
            hold=hold,
            events=[self._event(copy, settle.state, settle.detail)],
        )
        applied = await self._write(copy, outcome)
        if applied:
            if hold is not None:
                metrics.HOLDS_OPENED.inc()
            self._log_outcome(
                copy,
                settle.state,
                progress.attempts,
                upstream_transaction_id=settle.transaction_id,
            )
            return True
        # Our lease was taken over while the upstream took the record: the ledger must still
        # agree with this answer (a dead letter that guessed otherwise is closed).
        late = LateTaken(
            copy.message_id,
            settle.state,
            settle.transaction_id,
            settle.reconciled,
            f"late answer: {settle.detail}",
            hold,
        )
        with contextlib.suppress(Exception):
            if await self.ledger.record_late_taken(late):
                log.warning("late_answer_recorded", message_id=copy.message_id)
        return False

    async def _dead_letter(
        self,
        copy: Copy,
        epoch: int,
        attempts: int,
        budget_used_s: float,
        failure: DeadLetter,
        first_at: datetime | None = None,
    ) -> bool:
        row = _copy_dead_letter(
            copy,
            f"claim:{copy.message_id}:{epoch}",
            failure.reason,
            failure.error,
            status=failure.status,
            attempts=attempts,
            first_at=first_at,
        )
        now, dead_letter_id = row.last_attempt_at, row.dead_letter_id
        detail = f"{failure.reason}: {cap_text(failure.error, 500)}"
        outcome = Outcome(
            copy.message_id,
            epoch,
            MessageState.DEAD_LETTERED,
            attempts,
            budget_used_s,
            detail=detail,
            last_error=cap_text(failure.error),
            last_attempt_at=now,
            dead_letter_id=dead_letter_id,
            dead_letter=row,
            events=[self._event(copy, MessageState.DEAD_LETTERED, detail)],
        )
        applied = await self._write(copy, outcome)
        if applied:
            metrics.DEAD_LETTERS.labels(str(failure.reason)).inc()
            self._log_outcome(
                copy,
                MessageState.DEAD_LETTERED,
                attempts,
                reason=str(failure.reason),
                status=failure.status,
            )
        return applied

    async def _write(self, copy: Copy, outcome: Outcome) -> bool:
        try:
            return await self.writes.submit(outcome)
        except BadItem:
            # The database refused the outcome's values: keep the state, drop the extras.
            fallback = replace(
                outcome,
                detail=None,
                last_error="(text not storable)",
                upstream_transaction_id=None,
                reconciled_position_mwh=None,
                hold=replace(outcome.hold, reconciled=None, variance=None)
                if outcome.hold
                else None,
                events=[self._event(copy, outcome.state, None)],
            )
            return await self.writes.submit(fallback)

    @staticmethod
    def _not_accepted_row(copy: Copy, detail: str) -> DeadLetterRow:
        record = copy.record
        return _copy_dead_letter(
            copy,
            f"copy:{record.topic}:{record.partition}:{record.offset}:{copy.message_id}",
            DeadLetterReason.INVALID_MESSAGE,
            detail,
        )

    def _event(self, copy: Copy, state: MessageState, detail: str | None) -> AuditEvent:
        return AuditEvent(
            self.actor, f"message.{state}", state=state, message_id=copy.message_id, detail=detail
        )

    @staticmethod
    def _log_outcome(copy: Copy, state: MessageState, attempts: int, **extra: object) -> None:
        """One log line per settled record: the trace id follows the record from the intake."""
        metrics.DELIVERIES.labels(str(state)).inc()
        if copy.record.timestamp > 0:
            metrics.END_TO_END.labels(copy.lane, str(state)).observe(
                max(0.0, time.time() - copy.record.timestamp / 1000)
            )
        log.info(
            "delivery_outcome",
            state=str(state),
            message_id=copy.message_id,
            trace_id=copy.trace_id,
            desk=copy.desk,
            contract_id=copy.contract_id,
            attempts=attempts,
            **extra,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Stop every chain at its next safe point (in-flight POSTs finish and are written,
        waiting records are released), within `timeout`."""
        for chain in self.chains.values():
            chain.stopped.set()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        await stop_tasks(list(self.tasks), timeout)
        # Writes already queued (outcomes of answers received) still go in.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(self.writes.drained(), self.untrusted.drained())
        for committer in (self.claims, self.writes, self.untrusted):
            await committer.stop()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def dead_letter_row(
    record: ConsumedRecord,
    *,
    dedupe_key: str,
    reason: DeadLetterReason,
    error: str,
    status: int | None = None,
    attempts: int = 0,
    first_at: datetime | None = None,
    message_id: str | None = None,
    desk: str | None = None,
    settlement_run_id: str | None = None,
    contract_id: str | None = None,
) -> DeadLetterRow:
    """A dead letter keeping the consumed copy as it came (key, value, every header)."""
    now = datetime.now(UTC)
    return DeadLetterRow(
        dead_letter_id=new_id("dl"),
        dedupe_key=dedupe_key,
        reason=reason,
        error_status=status,
        attempts=attempts,
        last_error=cap_text(error),
        first_attempt_at=first_at or now,
        last_attempt_at=now,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        kafka_key=record.key,
        kafka_value=record.value or b"",
        headers=list(record.headers),
        message_id=message_id,
        desk=desk,
        settlement_run_id=settlement_run_id,
        contract_id=contract_id,
    )


def _copy_dead_letter(
    copy: Copy,
    dedupe_key: str,
    reason: DeadLetterReason,
    error: str,
    *,
    status: int | None = None,
    attempts: int = 0,
    first_at: datetime | None = None,
) -> DeadLetterRow:
    return dead_letter_row(
        copy.record,
        dedupe_key=dedupe_key,
        reason=reason,
        error=error,
        status=status,
        attempts=attempts,
        first_at=first_at,
        message_id=copy.message_id,
        desk=copy.desk,
        settlement_run_id=copy.settlement_run_id,
        contract_id=copy.contract_id,
    )


def _health(answer: Answer) -> Health:
    if answer.kind is AnswerKind.TRANSIENT:
        return Health.DOWN
    if answer.kind is AnswerKind.UNAUTHORIZED:
        return Health.UNKNOWN
    return Health.UP


def _wait_delay(waits: int, rng: random.Random) -> float:
    ceiling: float = min(WAIT_CAP_S, WAIT_BASE_S * (2 ** min(waits, 10)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
