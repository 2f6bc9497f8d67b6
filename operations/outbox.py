"""The dead-letter outbox: what the ledger records as a dead letter goes to the reconciliation
topic — after it is recorded, never before, and until the broker has acknowledged it.

Rules kept here (CONTRACT §5; issue #6 cases 6 and 11):
- the reconciliation record keeps the original key, value and headers (the bytes as they
  arrived) and adds `dead_letter_id`, `error.*` and `source.*`;
- a dead letter is marked published only after the broker acknowledged it; a publisher that
  dies in between publishes it again (consumers of the topic can tell by `dead_letter_id`);
- several publishers (workers, intakes) never take the same dead letters at once.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import delivery
from ledger.crypto import PayloadCipher
from runtime.kafka import KafkaPublisher, OutgoingRecord
from schemas.envelope import DeadLetterError

BATCH = 200


async def publish_dead_letters(
    engine: AsyncEngine, cipher: PayloadCipher, publisher: KafkaPublisher, topic: str
) -> int:
    """One round: publish up to BATCH unpublished dead letters; raises PublishFailed when the
    broker does not acknowledge (nothing is marked then)."""
    async with engine.begin() as conn:
        found = await delivery.unpublished(conn, BATCH, cipher)
        if not found:
            return 0
        records: list[OutgoingRecord] = []
        for dead in found:
            error = DeadLetterError(
                dead.error["reason"],
                dead.error["status"],
                dead.error["message"],
                dead.error["attempts"],
                dead.error["first_attempt_at"],
                dead.error["last_attempt_at"],
                dead.error["topic"],
                dead.error["partition"],
                dead.error["offset"],
            )
            headers = [*dead.headers, *error.headers(dead.dead_letter_id)]
            records.append((topic, dead.kafka_key, dead.kafka_value, headers))
        await publisher.send_all(records, what="dead letters")
        await delivery.mark_published(conn, [d.dead_letter_id for d in found])
        return len(found)
