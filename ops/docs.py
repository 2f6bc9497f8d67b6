"""The API documents: OpenAPI for the HTTP intake, AsyncAPI for the topics.

`python -m ops.docs` writes them to docs/; a test fails when the checked-in copies are stale.
The intake serves both (/openapi.json, /docs, /asyncapi.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from runtime.settings import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def asyncapi_document(settings: Settings | None = None) -> dict[str, Any]:
    from workers.app import reconciliation_publisher, wire_subscriber

    settings = settings or Settings()
    broker = KafkaBroker(settings.kafka_bootstrap_servers)

    async def documented_only(_: Any) -> None:  # the broker is never started here
        raise RuntimeError("documentation broker does not consume")

    wire_subscriber(broker, settings, documented_only)
    reconciliation_publisher(broker, settings)
    spec = AsyncAPI(
        broker,
        title="etrm-sync topics",
        version="1",
        description=(
            "Settlement records travel on the priority lane (iso_real_time) or the standard "
            "lane, keyed by contract_id, value = canonical record JSON, headers message_id, "
            "desk, trader, trace_id, schema_version=1, signature (kid=<id>,v1=<HMAC-SHA256>), "
            "and replay_of/replay_count on replays. Dead letters go to the reconciliation "
            "topic."
        ),
    )
    document: dict[str, Any] = json.loads(spec.to_specification().to_json())
    return document


def openapi_document() -> dict[str, Any]:
    from ingest.app import create_app

    document: dict[str, Any] = create_app(body_limit=Settings().max_body_bytes).openapi()
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
