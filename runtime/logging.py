"""Structured JSON logs, one event per line, for people and for the SIEM.

Record payloads and secrets are never passed to a logger; the redaction processor is a second
line of defence for field names that look like secrets.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from runtime.settings import SettingsError

_SECRET_WORDS = ("secret", "password", "token", "authorization", "key", "signature")


@functools.lru_cache(maxsize=512)
def _secret_name(name: str) -> bool:
    """Whether a field name looks like a secret's (event field names are few and fixed: each is
    looked at once, not on every line)."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS) and name not in (
        "idempotency_key_present",
        "kid",
    )


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if _secret_name(name):
            event[name] = "[redacted]"
    return event


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON lines on stderr at `level`, or at ETRM_LOG_LEVEL when set (a value that names no
    level stops the process at start, as any malformed setting does)."""
    wanted = os.environ.get("ETRM_LOG_LEVEL", "").strip().upper()
    if wanted and wanted not in LEVELS:
        raise SettingsError(
            "invalid setting(s): ETRM_LOG_LEVEL: expected one of debug, info, warning, error"
        )
    level = wanted or level
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    for noisy in ("aiokafka", "faststream", "uvicorn.access", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            # Tracebacks without frame locals: locals hold tokens, secrets and record payloads.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
