"""The ETRM upstream protocol of CONTRACT §4: OAuth2 client-credentials token (cached, renewed
before expiry and once more on a 401), Idempotency-Key = message id, HMAC request signature,
status classification, capped exponential backoff with full jitter honouring Retry-After, and
both an attempt limit and a time budget. One pooled httpx client per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)

from schemas.envelope import cap_text
from workers import metrics
from workers.rules import Verdict, backoff_delay, classify, parse_position, retry_after_seconds

SYNC_PATH = "/api/v1/settlements/sync"


class HttpPool:
    """Pooled HTTP to the upstream, as a few small httpx pools instead of one large one.

    httpcore scans every pooled connection on every request (expiry and readability checks),
    so one pool of 64 connections spent ~13 ms of CPU per request in the profile, against
    ~1.5 ms for pools of 4 to 8 — at 64 requests in flight that is 76 vs ~600 requests/s.
    """

    PER_POOL = 4

    def __init__(self, concurrency: int, timeout_s: float) -> None:
        pools = max(1, -(-concurrency // self.PER_POOL))
        size = -(-concurrency // pools) + 1
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(timeout_s), limits=limits, follow_redirects=False
            )
            for _ in range(pools)
        ]
        self._next = 0

    def client(self) -> httpx.AsyncClient:
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.client().post(url, **kwargs)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class TokenUnavailable(Exception):
    """The token endpoint did not give us a token."""


class TokenProvider:
    """Caches one access token; renews it before expiry; one renewal in flight at a time."""

    def __init__(
        self, http: HttpPool | httpx.AsyncClient, url: str, client_id: str, secret: str
    ) -> None:
        self._http = http
        self._url = url
        self._auth = httpx.BasicAuth(client_id, secret)
        self._token: str | None = None
        self._renew_at = 0.0
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def valid(self) -> bool:
        return self._token is not None and time.monotonic() < self._expires_at

    async def get(self) -> str:
        if self._token is not None and time.monotonic() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def renew(self, stale: str) -> None:
        """After a 401: renew unless another task already replaced the stale token."""
        async with self._lock:
            if self._token == stale or self._token is None:
                await self._fetch()

    async def _fetch(self) -> None:
        try:
            response = await self._http.post(
                self._url, data={"grant_type": "client_credentials"}, auth=self._auth
            )
        except httpx.HTTPError as exc:
            raise TokenUnavailable(f"token endpoint unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise TokenUnavailable(f"token endpoint answered {response.status_code}")
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise TokenUnavailable("token endpoint answered without an access_token") from None
        now = time.monotonic()
        self._token = token
        self._expires_at = now + lifetime
        # Renew well before expiry: the later of 80 % of the lifetime or a minute before the end.
        self._renew_at = now + max(lifetime * 0.8, lifetime - 60) if lifetime > 0 else now
        metrics.TOKEN_RENEWALS.inc()


@dataclass(slots=True)
class DeliveryResult:
    outcome: str  # 'delivered', 'upstream_rejected', 'retries_exhausted', 'token_unavailable'
    attempts: int
    first_attempt_at: datetime
    last_attempt_at: datetime
    status: int | None = None
    transaction_id: str | None = None
    reconciled_position_mwh: Decimal | None = None
    error: str | None = None


class _Retry(Exception):
    def __init__(
        self,
        error: str,
        status: int | None,
        retry_after: float | None = None,
        immediate: bool = False,
        token: bool = False,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.retry_after = retry_after
        self.immediate = immediate
        self.token = token


class _Final(Exception):
    def __init__(
        self,
        result_kind: str,
        error: str | None,
        status: int | None,
    ) -> None:
        super().__init__(error)
        self.kind = result_kind
        self.error = error
        self.status = status


ProgressHook = Callable[[int, str], Awaitable[None]]


class UpstreamClient:
    def __init__(
        self,
        http: HttpPool | httpx.AsyncClient,
        tokens: TokenProvider,
        *,
        base_url: str,
        signing_secret: str,
        max_attempts: int,
        budget_s: float,
        backoff_base_s: float,
        backoff_cap_s: float,
    ) -> None:
        self._http = http
        self._tokens = tokens
        self._url = base_url.rstrip("/") + SYNC_PATH
        self._secret = signing_secret.encode()
        self._max_attempts = max_attempts
        self._budget = budget_s
        self._base = backoff_base_s
        self._cap = backoff_cap_s

    @property
    def tokens(self) -> TokenProvider:
        return self._tokens

    def signature(self, body: bytes, timestamp: int) -> str:
        mac = hmac.new(self._secret, f"{timestamp}.".encode() + body, hashlib.sha256)
        return f"t={timestamp},v1={mac.hexdigest()}"

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retry) and exc.immediate:
            return 0.0
        retry_after = exc.retry_after if isinstance(exc, _Retry) else None
        return backoff_delay(
            state.attempt_number, base=self._base, cap=self._cap, retry_after=retry_after
        )

    async def deliver(
        self,
        body: bytes,
        message_id: str,
        trace_id: str,
        *,
        prior_attempts: int = 0,
        on_retry: ProgressHook | None = None,
    ) -> DeliveryResult:
        first_at = datetime.now(UTC)
        attempts = 0
        renewed = False
        last: _Retry | None = None

        async def attempt_once() -> DeliveryResult:
            nonlocal attempts, renewed
            attempts += 1
            metrics.UPSTREAM_ATTEMPTS.inc()
            try:
                token = await self._tokens.get()
            except TokenUnavailable as exc:
                raise _Retry(str(exc), None, token=True) from None
            now = int(time.time())
            headers = {
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": message_id,
                "X-Gateway-Trace-ID": trace_id,
                "X-Signature": self.signature(body, now),
                "Content-Type": "application/json",
            }
            started = time.perf_counter()
            try:
                response = await self._http.post(self._url, content=body, headers=headers)
            except httpx.TimeoutException:
                raise _Retry("upstream timed out", None) from None
            except httpx.TransportError as exc:
                raise _Retry(f"upstream unreachable: {type(exc).__name__}", None) from None
            finally:
                metrics.UPSTREAM_LATENCY.observe(time.perf_counter() - started)
            parsed = _json_body(response)
            verdict = classify(response.status_code, parsed)
            if verdict is Verdict.DELIVERED:
                return DeliveryResult(
                    "delivered",
                    prior_attempts + attempts,
                    first_at,
                    datetime.now(UTC),
                    status=response.status_code,
                    transaction_id=str(parsed["transaction_id"]),
                    reconciled_position_mwh=parse_position(parsed.get("reconciled_position_mwh")),
                )
            reason = cap_text(_reason(response, parsed))
            if verdict is Verdict.UNAUTHORIZED:
                if renewed:
                    raise _Final("token_unavailable", reason, 401)
                renewed = True
                try:
                    await self._tokens.renew(token)
                except TokenUnavailable as exc:
                    raise _Retry(str(exc), 401, token=True) from None
                raise _Retry(reason, 401, immediate=True)
            if verdict is Verdict.TRANSIENT:
                retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
                raise _Retry(reason, response.status_code, retry_after=retry_after)
            raise _Final("upstream_rejected", reason, response.status_code)

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if on_retry is not None and isinstance(exc, _Retry):
                await on_retry(prior_attempts + attempts, exc.error)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts) | stop_before_delay(self._budget),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await attempt_once()
        except _Retry as exc:
            last = exc
        except _Final as exc:
            return DeliveryResult(
                exc.kind,
                prior_attempts + attempts,
                first_at,
                datetime.now(UTC),
                status=exc.status,
                error=exc.error,
            )
        assert last is not None
        return DeliveryResult(
            "token_unavailable" if last.token else "retries_exhausted",
            prior_attempts + attempts,
            first_at,
            datetime.now(UTC),
            status=last.status,
            error=cap_text(last.error),
        )


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        parsed = json.loads(response.content, parse_float=Decimal)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reason(response: httpx.Response, parsed: dict[str, Any]) -> str:
    for key in ("detail", "error", "message", "title", "reason"):
        if isinstance(parsed.get(key), str):
            return f"{response.status_code}: {parsed[key]}"
    if 300 <= response.status_code < 400:
        return f"{response.status_code}: redirect not followed"
    return f"{response.status_code}: {response.text[:200]}"
