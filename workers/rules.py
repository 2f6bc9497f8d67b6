"""Delivery rules as plain functions of plain values (CONTRACT §2, §4): how an upstream answer is
classified, how long to wait before the next attempt, when a lower revision is superseded, and
when a reconciled position has drifted. Nothing here touches Kafka, HTTP or SQL.
"""

from __future__ import annotations

import random
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
PERMANENT_STATUSES = frozenset({400, 404, 422})


class Verdict(StrEnum):
    DELIVERED = "delivered"  # 201, or 200/409 naming the transaction it already has
    PERMANENT = "permanent"  # dead-letter at once as upstream_rejected
    TRANSIENT = "transient"  # retry with backoff
    UNAUTHORIZED = "unauthorized"  # renew the token once, then retry


def classify(status: int, body: Any) -> Verdict:
    has_txn = isinstance(body, dict) and bool(body.get("transaction_id"))
    if status == 201 and has_txn:
        return Verdict.DELIVERED
    if status in (200, 409) and has_txn:
        return Verdict.DELIVERED
    if status == 401:
        return Verdict.UNAUTHORIZED
    if status in TRANSIENT_STATUSES:
        return Verdict.TRANSIENT
    # 3xx is never followed; 400/404/422 and anything unexpected is a permanent rejection
    # (an unknown answer retried could create an effect we cannot see).
    return Verdict.PERMANENT


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """`Retry-After` as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt-1))), but never sooner than the
    upstream asked for with Retry-After (itself capped, so a hostile value cannot stall us)."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    jitter = (rng or random).uniform(0, ceiling)
    if retry_after is not None:
        return max(jitter, min(retry_after, cap))
    return jitter


def parse_position(value: Any) -> Decimal | None:
    """`reconciled_position_mwh` may be a JSON number or a string; floats are never used."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        return None
    return result if result.is_finite() else None


def drift(submitted: Decimal, reconciled: Decimal, threshold: Decimal) -> Decimal | None:
    """The variance when it exceeds threshold x |submitted|, else None."""
    variance = reconciled - submitted
    if abs(variance) > threshold * abs(submitted):
        return variance
    return None


def is_superseded(revision: int, highest_accepted: int | None) -> bool:
    """A revision lower than one the upstream already took must never be sent."""
    return highest_accepted is not None and revision < highest_accepted
