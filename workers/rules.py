"""Delivery rules as plain functions of plain values (CONTRACT §2, §4): how an upstream answer is
read, how long to wait before the next attempt, when a lower revision is superseded, and when a
reconciled position has drifted. Nothing here touches Kafka, HTTP or SQL.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal

from schemas.text import cap_text

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Largest reconciled position the ledger keeps (numeric(16,3)); beyond it the answer is
# unreadable, never a reason to fail a write.
POSITION_LIMIT = Decimal("9999999999999.999")
BODY_LIMIT = 64 * 1024


class AnswerKind(StrEnum):
    TAKEN = "taken"  # the upstream has the record: 201, or 200/409 naming its transaction
    REJECTED = "rejected"  # permanent: dead-letter at once as upstream_rejected
    TRANSIENT = "transient"  # retry with backoff
    UNAUTHORIZED = "unauthorized"  # renew the token once, then retry


PositionKnown = Literal["given", "absent", "unreadable"]


@dataclass(frozen=True, slots=True)
class Answer:
    """One upstream answer, read."""

    kind: AnswerKind
    status: int | None
    error: str = ""
    transaction_id: str | None = None
    created: bool = False  # 201: this very POST made the effect
    position: Decimal | None = None
    position_known: PositionKnown = "absent"
    retry_after_s: float | None = None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The answer's JSON object, or {} for anything else (binary, huge, not an object)."""
    if len(raw) > BODY_LIMIT:
        return {}
    try:
        # Numbers from their text (a reconciled position is compared to the cent).
        parsed = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def parse_position(value: Any) -> tuple[Decimal | None, PositionKnown]:
    """`reconciled_position_mwh` may be a JSON number or a string; it is read from its text,
    and a value the ledger cannot hold is unreadable rather than an error."""
    if value is None:
        return None, "absent"
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        return None, "unreadable"
    try:
        result = value if isinstance(value, Decimal) else Decimal(str(value).strip()[:64])
    except (InvalidOperation, ValueError):
        return None, "unreadable"
    if not result.is_finite() or abs(result) > POSITION_LIMIT:
        return None, "unreadable"
    return result.quantize(Decimal("0.001")), "given"


def _text(body: dict[str, Any], status: int, raw: bytes) -> str:
    for key in ("detail", "error", "message", "title", "reason"):
        if isinstance(body.get(key), str):
            return cap_text(f"{status}: {body[key]}")
    if 300 <= status < 400:
        return f"{status}: redirect not followed"
    return cap_text(f"{status}: {raw[:200].decode('utf-8', 'backslashreplace')}")


def read_answer(status: int, raw: bytes, retry_after: str | None, now: float) -> Answer:
    """Classify one answer (CONTRACT §4). Any 2xx means the upstream has the record: a record
    it may have taken is never dead-lettered, whatever else the body says or fails to say."""
    body = parse_body(raw)
    txn = body.get("transaction_id")
    transaction_id = cap_text(str(txn), 200) if isinstance(txn, str | int) and txn != "" else None
    if 200 <= status < 300 or (status == 409 and transaction_id is not None):
        position, known = parse_position(body.get("reconciled_position_mwh"))
        return Answer(
            AnswerKind.TAKEN,
            status,
            error="" if transaction_id else _text(body, status, raw),
            transaction_id=transaction_id,
            created=status == 201,
            position=position,
            position_known=known,
        )
    if status == 401:
        return Answer(AnswerKind.UNAUTHORIZED, status, _text(body, status, raw))
    if status in TRANSIENT_STATUSES:
        return Answer(
            AnswerKind.TRANSIENT,
            status,
            _text(body, status, raw),
            retry_after_s=retry_after_seconds(retry_after, now),
        )
    # 3xx is never followed; 400/404/422 and anything unexpected is a permanent rejection
    # (an unknown answer retried could create an effect we cannot see).
    return Answer(AnswerKind.REJECTED, status, _text(body, status, raw))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """`Retry-After` as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²" is a digit to isdigit(), not to float()
        return float(value[:12])
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None,
    rng: random.Random,
) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt-1))) — and never sooner than the
    upstream asked with Retry-After, honoured as given (the record's budget bounds it)."""
    ceiling = min(cap, base * (2 ** min(max(0, attempt - 1), 62)))
    jitter = rng.uniform(0, ceiling)
    if retry_after is not None:
        return max(jitter, retry_after)
    return jitter


def drift(submitted: Decimal, reconciled: Decimal, threshold: Decimal) -> Decimal | None:
    """The variance when it exceeds threshold x |submitted|, else None."""
    variance = reconciled - submitted
    if abs(variance) > threshold * abs(submitted):
        return variance
    return None


def is_superseded(revision: int, highest_taken: int | None) -> bool:
    """A revision lower than one the upstream already took must never be sent."""
    return highest_taken is not None and revision < highest_taken
