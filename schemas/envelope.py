"""What travels on Kafka: canonical value bytes, the message id, the lane and the signed headers.

The message id is a pure function of the desk, the settlement identity, the revision and the
content (CONTRACT §2), so the same record submitted twice is the same message, and a replay keeps
the id that the ledger and the upstream's Idempotency-Key already know.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.normalize import NormalizationError, normalize
from schemas.records import SOURCE_MODELS, CanonicalRecord, Market, iso_z
from schemas.text import cap_text, header_text

SCHEMA_VERSION = "1"
# Headers covered by the signature, in this order; replay headers are added by operators later
# and are covered too when present.
SIGNED_HEADERS = ("message_id", "desk", "trader", "trace_id", "schema_version")
# `batch_id` names the accepted request that published a copy, `replay_id` the operator's replay
# (or the continuation of parked records) that re-published it: together they say which copy
# of a record is the live one (see `publication_of`).
OPTIONAL_SIGNED_HEADERS = ("batch_id", "replay_of", "replay_count", "replay_id", "encryption")
_SIGNED_NAMES = (*SIGNED_HEADERS, *OPTIONAL_SIGNED_HEADERS)
# With ETRM_KAFKA_ENCRYPT_PAYLOADS the value on a lane is AES-256-GCM sealed and this header
# names the key: `kid=<key id>,alg=A256GCM` (ledger.crypto.LaneSealer).
ENCRYPTION_HEADER = "encryption"


def canonical_json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def identity_hash(desk: str, record: Mapping[str, Any]) -> str:
    """The settlement identity within a desk's book (CONTRACT §2), revision excluded."""
    identity = [
        desk,
        record["settlement_run_id"],
        record["contract_id"],
        record["market"],
        record["delivery_point"],
        record["delivery_start"],
        record["delivery_end"],
    ]
    return hashlib.sha256(b"etrm-identity/v1\0" + canonical_json(identity)).hexdigest()[:32]


def message_id_for(desk: str, value: bytes) -> str:
    """Identity + revision + content are all inside the canonical value bytes."""
    digest = hashlib.sha256(b"etrm-message/v1\0" + desk.encode() + b"\0" + value).hexdigest()
    return digest[:32]


def lane_for(market: str) -> str:
    """Real-time pricing takes the priority lane; everything else the standard lane."""
    return "priority" if market == Market.ISO_REAL_TIME.value else "standard"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One accepted record, serialized once, ready for Kafka and the ledger."""

    message_id: str
    identity: str
    contract_id: str
    market: str
    revision: int
    position_mwh: str
    value: bytes

    @property
    def lane(self) -> str:
        return lane_for(self.market)

    def __reduce__(self) -> tuple[type[Envelope], tuple[str, str, str, str, int, str, bytes]]:
        # A big batch's envelopes come back from the worker process that prepared them: built
        # from their fields in one call, unpickling takes half the time of the slotted
        # dataclass's own per-field __setstate__ (5,000 of them, in a thread of the intake).
        return (
            Envelope,
            (
                self.message_id,
                self.identity,
                self.contract_id,
                self.market,
                self.revision,
                self.position_mwh,
                self.value,
            ),
        )


def envelope_for(desk: str, record: CanonicalRecord) -> Envelope:
    wire = record.to_wire()
    value = canonical_json(wire)
    return Envelope(
        message_id=message_id_for(desk, value),
        identity=identity_hash(desk, wire),
        contract_id=record.contract_id,
        market=wire["market"],
        revision=record.revision,
        position_mwh=wire["position_mwh"],
        value=value,
    )


@dataclass(frozen=True, slots=True)
class FieldError:
    """One schema violation: which record, which field path, what is wrong."""

    index: int | None
    loc: tuple[str | int, ...]
    message: str

    @property
    def pointer(self) -> str:
        return ".".join(str(p) for p in self.loc)


def validate_record(raw: Any, index: int | None) -> CanonicalRecord | list[FieldError]:
    """Choose the source model by `kind`, validate, and normalize into the canonical record."""
    if not isinstance(raw, dict):
        return [FieldError(index, (), "a record must be a JSON object")]
    kind = raw.get("kind")
    model = SOURCE_MODELS.get(kind) if isinstance(kind, str | None) else None
    if model is None:
        allowed = ", ".join(sorted(k for k in SOURCE_MODELS if k))
        return [FieldError(index, ("kind",), f"unknown kind; expected one of: {allowed}")]
    try:
        source = model.model_validate(raw)
        return normalize(source)
    except ValidationError as exc:
        return [
            FieldError(index, tuple(e["loc"]), e["msg"].removeprefix("Value error, "))
            for e in exc.errors()
        ]
    except NormalizationError as exc:
        return [FieldError(index, exc.loc, exc.message)]


# -- Kafka message signing (HMAC over the value and the identity headers) ---------------------


@functools.lru_cache(maxsize=4096)
def _shared_header_digest(part: str) -> bytes:
    """The digest of a signed header that many records carry alike (their desk, trader, trace
    and batch or replay): a batch's records are signed, and checked, one after another."""
    return hashlib.sha256(part.encode()).digest()


def _signing_input(value: bytes, headers: Mapping[str, str]) -> bytes:
    digests = [hashlib.sha256(value).digest()]
    for name in _SIGNED_NAMES:
        if name in headers:
            part = f"{name}={headers[name]}"
            if name == "message_id":  # each record's own
                digests.append(hashlib.sha256(part.encode()).digest())
            else:
                digests.append(_shared_header_digest(part))
    return b"\n".join(digests)


def _mac(secret: bytes, value: bytes, headers: Mapping[str, str]) -> str:
    return hmac.digest(secret, _signing_input(value, headers), "sha256").hex()


def sign_message(value: bytes, headers: Mapping[str, str], kid: str, secret: bytes) -> str:
    return f"kid={kid},v1={_mac(secret, value, headers)}"


def verify_message(
    value: bytes, headers: Mapping[str, str], keys: Mapping[str, bytes]
) -> str | None:
    """None when the signature verifies, else the reason it does not."""
    signature = headers.get("signature")
    if not signature:
        return "signature header missing"
    fields = dict(part.split("=", 1) for part in signature.split(",") if "=" in part)
    secret = keys.get(fields.get("kid", ""))
    if secret is None:
        return "unknown signing key id"
    if any(h not in headers for h in SIGNED_HEADERS):
        return "identity headers missing"
    if not hmac.compare_digest(_mac(secret, value, headers), fields.get("v1", "")):
        return "signature does not verify"
    return None


@dataclass(frozen=True, slots=True)
class DeadLetterError:
    """Why a record is on the reconciliation topic (CONTRACT §5 `error.*` / `source.*`)."""

    reason: str
    status: int | None
    message: str
    attempts: int
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    topic: str
    partition: int
    offset: int

    def headers(self, dead_letter_id: str) -> list[tuple[str, bytes]]:
        return [
            ("dead_letter_id", dead_letter_id.encode()),
            ("error.reason", self.reason.encode()),
            ("error.status", str(self.status or "").encode()),
            ("error.message", cap_text(self.message).encode()),
            ("error.attempts", str(self.attempts).encode()),
            ("error.first_attempt_at", (iso_z(self.first_attempt_at) or "").encode()),
            ("error.last_attempt_at", (iso_z(self.last_attempt_at) or "").encode()),
            ("source.topic", self.topic.encode()),
            ("source.partition", str(self.partition).encode()),
            ("source.offset", str(self.offset).encode()),
        ]


def kafka_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in headers.items()]


def header_map(raw: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Headers as text; any bytes at all (invalid UTF-8, NUL, a null value) decode without error.
    A name given twice keeps its first value (what the signature was computed over)."""
    result: dict[str, str] = {}
    for name, value in raw:
        if name not in result:
            result[name] = header_text(value)
    return result


def publication_of(headers: Mapping[str, str]) -> str | None:
    """Which publication a copy belongs to: a replay (or continuation) names itself in
    `replay_id`; a desk's accepted request in `batch_id`."""
    return headers.get("replay_id") or headers.get("batch_id")
