"""The API documents: OpenAPI for the HTTP intake, AsyncAPI for the topics.

`python -m ops.docs` writes them to docs/; a test fails when the checked-in copies are stale.
The intake serves both (/openapi.json, /docs, /asyncapi.json — the AsyncAPI file ships inside
the package).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from ingest.app import create_app
from ingest.deps import IntakeServices
from runtime.settings import KafkaSettings
from schemas.records import CanonicalRecord

DOCS = Path(__file__).resolve().parent.parent / "docs"

_TEXT = {"type": "string"}
# CONTRACT §5: headers on every message, on replays, and on dead letters.
RECORD_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": ["message_id", "desk", "trader", "trace_id", "schema_version", "signature"],
    "properties": {
        "message_id": {**_TEXT, "description": "Deterministic id (identity + revision + content)"},
        "desk": {**_TEXT, "description": "The submitting desk"},
        "trader": {**_TEXT, "description": "The token's subject"},
        "trace_id": {**_TEXT, "description": "The trace id answered to the desk"},
        "schema_version": {"type": "string", "const": "1"},
        "signature": {
            **_TEXT,
            "description": "kid=<key id>,v1=<hex HMAC-SHA256 over the value and the identity "
            "headers>",
        },
        "batch_id": {**_TEXT, "description": "The accepted request that published this copy"},
        "replay_id": {**_TEXT, "description": "The replay or continuation that re-published it"},
        "replay_of": {**_TEXT, "description": "On replays: the dead letter replayed"},
        "replay_count": {**_TEXT, "description": "On replays: 1 for the first replay, then 2…"},
        "traceparent": {
            **_TEXT,
            "description": "W3C trace context of the intake's publish (when tracing is on); "
            "not signed, informational only",
        },
    },
}
DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": [
        *RECORD_HEADERS["required"],
        "dead_letter_id",
        "error.reason",
        "error.status",
        "error.message",
        "error.attempts",
        "error.first_attempt_at",
        "error.last_attempt_at",
        "source.topic",
        "source.partition",
        "source.offset",
    ],
    "properties": {
        **RECORD_HEADERS["properties"],
        "dead_letter_id": {**_TEXT, "description": "Unique per dead letter (dedupe on it)"},
        "error.reason": {
            "type": "string",
            "enum": [
                "upstream_rejected",
                "retries_exhausted",
                "invalid_signature",
                "invalid_message",
                "token_unavailable",
                "drift_rejected",
            ],
        },
        "error.status": {**_TEXT, "description": "The upstream's HTTP status, if any"},
        "error.message": {**_TEXT, "maxLength": 2048},
        "error.attempts": _TEXT,
        "error.first_attempt_at": {**_TEXT, "description": "UTC ISO 8601 with Z"},
        "error.last_attempt_at": {**_TEXT, "description": "UTC ISO 8601 with Z"},
        "source.topic": _TEXT,
        "source.partition": _TEXT,
        "source.offset": _TEXT,
    },
}


def asyncapi_document(settings: KafkaSettings | None = None) -> dict[str, Any]:
    settings = settings or KafkaSettings()
    broker = KafkaBroker(settings.kafka_bootstrap_servers)

    # A documentation broker: it is never started, its handlers only carry the payload type.
    for lane, topic in settings.lanes.items():

        @broker.subscriber(
            topic,
            title=f"on_{lane}_lane",
            description=f"Settlement records of the {lane} lane, key = contract_id",
        )
        async def documented(record: CanonicalRecord) -> None:  # pragma: no cover
            raise RuntimeError("documentation only")

    broker.publisher(
        settings.topic_reconciliation,
        title="to_reconciliation",
        description="Dead letters: the original key, value (canonical record) and headers, "
        "plus dead_letter_id, error.* and source.* (CONTRACT §5).",
        schema=CanonicalRecord,
    )
    spec = AsyncAPI(
        broker,
        title="etrm-sync topics",
        version="1",
        description=(
            "Settlement records travel on the priority lane (iso_real_time) or the standard "
            "lane, keyed by contract_id, value = canonical record JSON (decimals as strings at "
            "full scale). Dead letters go to the reconciliation topic."
        ),
    )
    document: dict[str, Any] = json.loads(spec.to_specification().to_json())
    for name, message in document.get("components", {}).get("messages", {}).items():
        message["headers"] = (
            DEAD_LETTER_HEADERS if "reconciliation" in name.lower() else RECORD_HEADERS
        )
    return document


def openapi_document() -> dict[str, Any]:
    async def never() -> IntakeServices:  # the app is not started to describe it
        raise RuntimeError("documentation only")

    document: dict[str, Any] = create_app(never, body_limit=16 * 1024 * 1024).openapi()
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "openapi.json").write_text(render(openapi_document()))
    (DOCS / "asyncapi.json").write_text(render(asyncapi_document()))
    sys.stdout.write(f"wrote {DOCS}/openapi.json and {DOCS}/asyncapi.json\n")


if __name__ == "__main__":
    main()
