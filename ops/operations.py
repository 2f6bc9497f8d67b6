"""What operators do — replay dead letters, release or reject holds — as one service used by
both the HTTP API and the `etrm-sync dlq|holds` commands, so the rules cannot drift apart.

Rules kept here:
- a replay republishes the original record with its original message id (the ledger and the
  upstream's Idempotency-Key make a second effect impossible) and `replay_of`/`replay_count`;
  the revision rule in the worker turns a stale replay into `superseded`;
- a replay of more than ETRM_REPLAY_APPROVAL_THRESHOLD records, or of more than one desk's
  records, waits for a second operator's approval (four eyes);
- replays run in chunks: requeue, publish (acknowledged), mark replayed; an interrupted replay
  resumes with what is still pending and cannot publish a record twice into an effect;
- a rejected hold is on the reconciliation topic before the ledger says `rejected`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.publisher import SettlementPublisher
from ledger import reconciliation as recon
from ledger.audit import Actor
from ledger.crypto import PayloadCipher
from ledger.store import new_id
from runtime.settings import Settings
from schemas.envelope import SCHEMA_VERSION, DeadLetterError

log = structlog.get_logger("etrm.ops")
REPLAY_CHUNK = 200
REPLAY_LEASE_S = 60.0

Progress = Callable[[int, int], None]


class OperationRefused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class Operations:
    def __init__(
        self, engine: AsyncEngine, publisher: SettlementPublisher, settings: Settings
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.settings = settings
        self.cipher = PayloadCipher(settings.encryption_keyring())

    # -- replay --------------------------------------------------------------------------------

    async def request_replay(
        self,
        actor: Actor,
        *,
        message_ids: Sequence[str] | None,
        where: recon.DeadLetterFilter | None,
        reason: str,
        dry_run: bool,
    ) -> dict[str, Any]:
        items = await recon.replay_candidates(self.engine, message_ids=message_ids, where=where)
        desks = sorted({i.desk for i in items})
        needs_approval = len(items) > self.settings.replay_approval_threshold or len(desks) > 1
        summary: dict[str, Any] = {
            "count": len(items),
            "needs_approval": needs_approval,
            "desks": desks,
        }
        if dry_run:
            summary["items"] = [
                {
                    "dead_letter_id": i.dead_letter_id,
                    "message_id": i.message_id,
                    "desk": i.desk,
                    "contract_id": i.contract_id,
                    "reason": i.reason,
                }
                for i in items
            ]
            return {"dry_run": True, **summary}
        if not items:
            raise OperationRefused(
                422, "nothing_to_replay", "no open, replayable dead letters match"
            )
        replay_id = new_id("replay")
        await recon.create_replay(
            self.engine,
            replay_id=replay_id,
            needs_approval=needs_approval,
            reason=reason,
            actor=actor,
            items=items,
        )
        log.info(
            "replay_requested",
            replay_id=replay_id,
            operator=actor.name,
            count=len(items),
            needs_approval=needs_approval,
        )
        state = "pending_approval" if needs_approval else "approved"
        return {"replay_id": replay_id, "state": state, **summary}

    async def approve_replay(self, replay_id: str, actor: Actor, reason: str | None) -> None:
        try:
            await recon.approve_replay(self.engine, replay_id, actor, reason)
        except recon.ReplayRefused as exc:
            raise OperationRefused(exc.status, exc.code, exc.detail) from None
        log.info("replay_approved", replay_id=replay_id, operator=actor.name)

    async def run_replay(
        self, replay_id: str, actor: Actor, progress: Progress | None = None
    ) -> bool:
        """Publish what is still pending; False when the replay is not runnable right now."""
        if not await recon.take_replay(self.engine, replay_id, REPLAY_LEASE_S):
            return False
        replay = await recon.get_replay(self.engine, replay_id)
        assert replay is not None
        total, done = replay["item_count"], replay["progress"]["published"]
        while True:
            items = await recon.pending_replay_items(
                self.engine, replay_id, REPLAY_CHUNK, self.cipher
            )
            if not items:
                break
            await recon.requeue_for_replay(
                self.engine, replay_id, [i["message_id"] for i in items], actor, REPLAY_LEASE_S
            )
            await self.publisher.send_all(
                [self._replayed_record(replay_id, item) for item in items]
            )
            await recon.mark_replayed(self.engine, replay_id, items, actor)
            done += len(items)
            if progress:
                progress(done, total)
        await recon.finish_replay(self.engine, replay_id, actor)
        log.info("replay_completed", replay_id=replay_id, published=done)
        return True

    def _replayed_record(
        self, replay_id: str, item: dict[str, Any]
    ) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        original: dict[str, str] = {
            k: v
            for k, v in item["kafka_headers"].items()
            if not k.startswith(("error.", "source.")) and k != "signature"
        }
        original["replay_of"] = item["dead_letter_id"]
        original["replay_count"] = str(int(item["earlier_replays"]) + 1)
        value: bytes = item["kafka_value"]
        return (
            item["source_topic"],
            item["kafka_key"],
            value,
            self.publisher.signed(value, original),
        )

    async def resume_replays(self, actor: Actor) -> None:
        for replay_id in await recon.runnable_replays(self.engine):
            await self.run_replay(replay_id, actor)

    # -- holds ---------------------------------------------------------------------------------

    async def decide_hold(
        self, hold_id: str, decision: str, actor: Actor, reason: str
    ) -> dict[str, Any]:
        hold = await recon.hold_for_decision(self.engine, hold_id, self.cipher)
        if hold is None:
            raise OperationRefused(404, "not_found", "no such hold")
        if hold["state"] != "open":
            raise OperationRefused(409, "already_decided", f"hold is already {hold['state']}")
        dead_letter = None
        if decision == "rejected":
            dead_letter = await self._publish_drift_rejection(hold, reason)
        if not await recon.decide_hold(
            self.engine, hold_id, decision, actor, reason, dead_letter, self.cipher
        ):
            raise OperationRefused(409, "already_decided", "hold was decided meanwhile")
        log.info("hold_decided", hold_id=hold_id, decision=decision, operator=actor.name)
        return {
            "hold_id": hold_id,
            "message_id": hold["message_id"],
            "state": decision,
            "dead_letter_id": dead_letter["dead_letter_id"] if dead_letter else None,
        }

    async def _publish_drift_rejection(self, hold: dict[str, Any], reason: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        identity = {
            "message_id": hold["message_id"],
            "desk": hold["desk"],
            "trader": hold["trader"],
            "trace_id": hold["trace_id"],
            "schema_version": SCHEMA_VERSION,
        }
        if hold["batch_id"]:
            identity["batch_id"] = hold["batch_id"]
        message = (
            f"reconciled {hold['reconciled_position_mwh']} vs submitted "
            f"{hold['submitted_position_mwh']} (variance {hold['variance']}); "
            f"rejected: {reason}"
        )
        error = DeadLetterError(
            "drift_rejected",
            None,
            message,
            hold["attempts"],
            hold["first_attempt_at"] or now,
            hold["last_attempt_at"] or now,
            hold["topic"],
            hold["source_partition"] or 0,
            hold["source_offset"] or 0,
        )
        value: bytes = hold["payload"]
        headers = [*self.publisher.signed(value, identity), *error.headers()]
        await self.publisher.send_all(
            [(self.settings.topic_reconciliation, hold["contract_id"].encode(), value, headers)]
        )
        return {
            "dead_letter_id": new_id("dl"),
            "message_id": hold["message_id"],
            "desk": hold["desk"],
            "settlement_run_id": hold["settlement_run_id"],
            "contract_id": hold["contract_id"],
            "reason": "drift_rejected",
            "error_status": None,
            "attempts": hold["attempts"],
            "last_error": message,
            "first_attempt_at": error.first_attempt_at,
            "last_attempt_at": error.last_attempt_at,
            "source_topic": error.topic,
            "source_partition": error.partition,
            "source_offset": error.offset,
            "kafka_key": hold["contract_id"].encode(),
            "kafka_value": value,
            "kafka_headers": {k: v.decode() for k, v in headers},
        }


def replay_id_valid(replay_id: str) -> bool:
    return replay_id.startswith("replay_") and len(replay_id) <= 64


def operator_actor(
    name: str, desk: str = "ops", token_id: str | None = None, address: str | None = None
) -> Actor:
    return Actor("operator", name, desk, token_id or uuid.uuid4().hex, address)
