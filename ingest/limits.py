"""Abuse limits at the door: a token bucket per desk (one desk flooding cannot slow another),
a body size cap on every route, and repeated authentication failures raising an alert."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qsl

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.problems import Problem
from schemas.text import has_unsafe_chars

security_log = structlog.get_logger("etrm.security")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class DeskRateLimiter:
    """`rate` per second with bursts of `burst`, per desk: requests (cost 1 each), or, as the
    record limiter, records (a request costs its record count)."""

    def __init__(
        self,
        default: tuple[float, int],
        overrides: dict[str, tuple[float, int]],
        *,
        unit: str = "request",
    ):
        self._default = default
        self._overrides = overrides
        self._buckets: dict[str, _Bucket] = {}
        self._unit = unit

    def retry_after(self, desk: str, cost: float = 1.0) -> float | None:
        """None when it may pass (and is counted); else seconds until it could."""
        rate, burst = self._overrides.get(desk, self._default)
        cost = min(cost, float(burst))  # a request larger than the burst waits for a full one
        now = time.monotonic()
        bucket = self._buckets.get(desk)
        if bucket is None:
            bucket = self._buckets[desk] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        return (cost - bucket.tokens) / rate if rate > 0 else 60.0

    def others_seen(self, desk: str, within_s: float) -> bool:
        """Whether a desk other than `desk` was counted in the last `within_s` seconds."""
        since = time.monotonic() - within_s
        return any(b.updated >= since for d, b in self._buckets.items() if d != desk)

    def check(self, desk: str, subject: str, cost: float = 1.0) -> None:
        wait = self.retry_after(desk, cost)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            code = "rate_limited" if self._unit == "request" else f"{self._unit}_rate_limited"
            security_log.warning(code, desk=desk, subject=subject, retry_after_s=seconds)
            raise Problem(
                429,
                code,
                f"desk {desk} is over its {self._unit} rate",
                headers={"Retry-After": str(seconds)},
            )


class FailureAlarm:
    """Counts authentication failures per source address in a sliding window and raises one
    `security_alert` event when a source crosses the threshold (CIP-007 R4/R5.7 style)."""

    def __init__(self, threshold: int = 10, window_s: float = 60.0) -> None:
        self._threshold = threshold
        self._window = window_s
        self._failures: dict[str, deque[float]] = {}
        self._alerted: dict[str, float] = {}

    def failed(self, source: str, reason: str) -> bool:
        now = time.monotonic()
        seen = self._failures.setdefault(source, deque())
        seen.append(now)
        while seen and now - seen[0] > self._window:
            seen.popleft()
        if len(self._failures) > 10_000:  # bounded memory under a spray of sources
            self._failures = {source: seen}
        if len(seen) >= self._threshold and now - self._alerted.get(source, -1e9) > self._window:
            self._alerted[source] = now
            security_log.error(
                "security_alert",
                alert="repeated_authentication_failures",
                source=source,
                failures=len(seen),
                window_s=self._window,
                last_reason=reason,
            )
            return True
        return False


class BodyLimit:
    """413 for any request body over the limit, declared or streamed, on every route; 408 for a
    body that does not arrive within `timeout_s`.

    The body is read (and thrown away) before the 413 is sent, up to DRAIN_LIMIT: a client
    still writing its body when the server answers and closes would see a reset connection
    instead of the answer.
    """

    DRAIN_LIMIT = 64 * 1024 * 1024
    DRAIN_SECONDS = 30.0

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unsafe = _unsafe_part(scope)
        if unsafe is not None:
            # NUL and other control characters never reach SQL (Postgres refuses NUL in text,
            # which would surface as a 500) nor a log line.
            await _refuse(
                send,
                400,
                "invalid_characters",
                "Bad request",
                f"{unsafe} contains a control character or an invalid code point",
            )
            return
        headers = scope.get("headers", [])
        if {b"content-length", b"transfer-encoding"} <= {name for name, _ in headers}:
            # Two framings of one body: a proxy in front may read it one way and we the other
            # (request smuggling). Refused, and the connection closed (RFC 9112 §6.1).
            await _refuse(
                send,
                400,
                "ambiguous_framing",
                "Bad request",
                "Content-Length and Transfer-Encoding together are refused",
            )
            return
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._drain(receive, int(value))
                await _refuse(
                    send,
                    413,
                    "payload_too_large",
                    "Payload too large",
                    f"body exceeds {self.limit} bytes",
                )
                return
        seen, complete = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: what follows is a disconnect, wait as long as it takes
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise Problem(
                    408, "request_timeout", f"the body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise Problem(413, "payload_too_large", f"body exceeds {self.limit} bytes")
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, counted, send)

    async def _drain(self, receive: Receive, declared: int) -> None:
        if declared > self.DRAIN_LIMIT:
            return
        deadline = time.monotonic() + self.DRAIN_SECONDS
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


def _unsafe_part(scope: Scope) -> str | None:
    """'path' or 'query parameter <name>' when it holds NUL, a control character or a lone
    surrogate; None when the request line is clean."""
    if has_unsafe_chars(scope.get("path", "")):
        return "path"
    raw = scope.get("query_string", b"")
    if raw:
        try:
            pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return "query"
        for name, value in pairs:
            if has_unsafe_chars(name) or has_unsafe_chars(value):
                return "query parameter " + (name if not has_unsafe_chars(name) else "(name)")
    return None


async def _refuse(send: Send, status: int, code: str, title: str, detail: str) -> None:
    """A problem+json answer before any route ran; the connection is closed after it."""
    body = json.dumps(
        {
            "type": f"https://etrm-sync.dev/problems/{code}",
            "title": title,
            "status": status,
            "code": code,
            "detail": detail,
        },
        separators=(",", ":"),
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
