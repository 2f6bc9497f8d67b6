"""Untrusted text made safe to keep and to show: what an upstream answered, what a Kafka header
carried, what a hostile client sent. Postgres `text` refuses NUL and lone surrogates cannot be
encoded, so one odd byte must never fail a whole write; and error texts are capped (CONTRACT §5:
`error.message` at most 2 KiB). No I/O.
"""

from __future__ import annotations

ERROR_TEXT_LIMIT = 2048
_ELLIPSIS = "..."
# C0 controls other than tab/newline, DEL and C1 controls: kept as visible escapes.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0B, 0x20), 0x7F)}
_CONTROL.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})


def clean_text(value: str) -> str:
    """NUL, control characters and lone surrogates become visible escapes; the rest stays."""
    if value.isprintable():
        return value
    cleaned = value.translate(_CONTROL)
    return cleaned.encode("utf-8", "backslashreplace").decode("utf-8")


def cap_text(value: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """Clean, then cut to at most `limit` UTF-8 bytes (on a character boundary)."""
    cleaned = clean_text(value)
    encoded = cleaned.encode("utf-8")
    if len(encoded) <= limit:
        return cleaned
    return encoded[: limit - len(_ELLIPSIS)].decode("utf-8", "ignore") + _ELLIPSIS


def header_text(value: bytes | None) -> str:
    """A Kafka header value as text for people: invalid UTF-8 shown as escapes, never an error."""
    if value is None:
        return ""
    return clean_text(value.decode("utf-8", "backslashreplace"))


def has_unsafe_chars(value: str) -> bool:
    """True for NUL, other control characters or lone surrogates (refused at the intake)."""
    if value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return any(ord(c) in _CONTROL for c in value)
