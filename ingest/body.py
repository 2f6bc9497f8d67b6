"""Reading a request body: size limit, JSON media type, strict JSON.

Numbers are read from their text as Decimal (never a binary float). NaN/Infinity are read as
the Decimal values they name, so the record's own validation refuses them with the record index
and field like any other schema error (422); duplicate object keys are a 422; text that is not
JSON at all is a 400.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from fastapi import Request

from ingest.problems import Problem
from runtime.cpu import off_loop

HEAVY_BODY_BYTES = 64 * 1024


class _SchemaViolation(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _SchemaViolation(f"duplicate object key {key!r}")
        result[key] = value
    return result


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(
            raw,
            parse_float=Decimal,
            parse_constant=Decimal,
            object_pairs_hook=_unique_keys,
        )
    except _SchemaViolation as exc:
        raise Problem(
            422,
            "schema_violation",
            str(exc),
            errors=[{"index": None, "field": "", "message": str(exc)}],
        ) from None
    except (ValueError, RecursionError) as exc:
        raise Problem(400, "malformed_json", f"body is not parseable JSON: {exc}") from None


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, after the media type and size checks."""
    if not _is_json(request.headers.get("content-type")):
        raise Problem(415, "unsupported_media_type", "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload_too_large", f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "payload_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(raw: bytes) -> Any:
    # A big body's parse (Decimal numbers, duplicate-key checks) runs off the event loop.
    return await off_loop(len(raw) > HEAVY_BODY_BYTES, lambda: parse_json(raw))


async def read_json(request: Request, limit: int) -> Any:
    return await parse_body(await read_body(request, limit))
