"""Bearer token verification (CONTRACT §6, RFC 8725) and the principal a request acts as.

Rules kept here: only RS256, ES256 and EdDSA; the key comes from our JWKS by `kid`, never from
the token (`jku`, `x5u`, `jwk`, `x5c` are refused); `iss`, `aud`, `sub`, `exp`, `iat`, `desk` and
`scope` are required; tokens over 8 KiB are refused; unknown `kid`s refresh the JWKS at most once
per cooldown so a flood of forged tokens cannot hammer the identity provider.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import structlog
from jwt import PyJWK, PyJWKSet

from ingest.problems import Problem

ALLOWED_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_KEY_ALGORITHMS = {"RSA": {"RS256"}, "EC": {"ES256"}, "OKP": {"EdDSA"}}
MAX_TOKEN_BYTES = 8 * 1024
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat")
# Scopes matched exactly: a made-up `ops:anything` grants nothing.
OPERATOR_SCOPES = frozenset({"ops:read", "ops:replay", "ops:holds", "ops:upstream"})
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")

log = structlog.get_logger("etrm.security")


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    desk: str
    scopes: frozenset[str]
    contracts: tuple[str, ...] | None
    token_id: str | None
    cert_thumbprint: str | None

    @property
    def is_operator(self) -> bool:
        return not self.scopes.isdisjoint(OPERATOR_SCOPES)

    def sees_desk(self, desk: str) -> bool:
        return desk == self.desk or self.is_operator

    def may_touch_contract(self, contract_id: str) -> bool:
        if self.contracts is None:
            return True
        return any(_pattern(p).fullmatch(contract_id) for p in self.contracts)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(glob: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(glob)
    if compiled is None:
        compiled = re.compile(".*".join(re.escape(part) for part in glob.split("*")))
        if len(_PATTERNS) < 10_000:
            _PATTERNS[glob] = compiled
    return compiled


def unauthorized(reason: str, *, presented: bool = True) -> Problem:
    """401. A request that presented no bearer token at all gets the bare challenge: RFC 6750
    (3.1) gives an error code only to a token that was presented and failed."""
    return Problem(
        401,
        "unauthorized",
        "a valid bearer token is required",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"' if presented else "Bearer"},
        reason=reason,
    )


class JwksKeys:
    """Signing keys from a JWKS file or URL, refreshed on rotation with a cooldown."""

    def __init__(self, source: str, *, cooldown_s: float = 30.0, max_age_s: float = 300.0) -> None:
        self._source = source
        self._is_url = source.startswith(("http://", "https://"))
        self._cooldown = cooldown_s
        self._max_age = max_age_s
        self._keys: dict[str, PyJWK] = {}
        self._loaded_at = 0.0
        self._attempted_at = float("-inf")
        self._file_mtime = 0.0
        self._file_checked = 0.0
        self._lock = asyncio.Lock()

    async def _fetch(self) -> dict[str, Any]:
        if self._is_url:
            async with httpx.AsyncClient(timeout=5.0) as http:
                response = await http.get(self._source)
                response.raise_for_status()
                data: dict[str, Any] = response.json()
                return data
        path = Path(self._source)
        self._file_mtime = (await asyncio.to_thread(path.stat)).st_mtime
        text = await asyncio.to_thread(path.read_text)
        loaded: dict[str, Any] = json.loads(text)
        return loaded

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._attempted_at < self._cooldown:
                return
            self._attempted_at = now
            try:
                data = await self._fetch()
                keyset = PyJWKSet.from_dict(data)
            except Exception as exc:
                log.warning("jwks_refresh_failed", error=type(exc).__name__)
                return
            self._keys = {str(k.key_id or f"#{i}"): k for i, k in enumerate(keyset.keys)}
            self._loaded_at = now
            log.info("jwks_loaded", keys=len(self._keys))

    def _stale(self) -> bool:
        if not self._keys:
            return True
        if not self._is_url:
            now = time.monotonic()
            if now - self._file_checked < 1.0:  # one stat a second, not one per request
                return False
            self._file_checked = now
            try:
                return Path(self._source).stat().st_mtime != self._file_mtime
            except OSError:
                return False
        return time.monotonic() - self._loaded_at > self._max_age

    async def key_for(self, kid: str | None, alg: str) -> PyJWK | None:
        if self._stale():
            # Only the very first load skips the cooldown: an identity provider that is down
            # must not be asked again on every request.
            await self.refresh(force=self._attempted_at == float("-inf"))
        key = self._pick(kid, alg)
        if key is None:
            await self.refresh()  # rotation: at most once per cooldown
            key = self._pick(kid, alg)
        return key

    def _pick(self, kid: str | None, alg: str) -> PyJWK | None:
        if kid is not None:
            key = self._keys.get(kid)
        elif len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        else:
            key = None
        if key is None or alg not in _KEY_ALGORITHMS.get(key.key_type or "", set()):
            return None
        return key


@dataclass(frozen=True, slots=True)
class _Verified:
    kid: str | None
    alg: str
    key: PyJWK
    expires: float
    principal: Principal


class TokenVerifier:
    """Bearer tokens checked against the identity provider's keys. A token verified once is
    remembered (by its exact text) until it expires: an ES256 signature check was ~5 % of the
    intake's CPU under single records, and a desk sends the same token with every request.
    A remembered token is still refused once it expires, and as soon as its signing key leaves
    the key set (rotation or a refresh): the key it was verified with must still be the one the
    key set gives for its kid."""

    MAX_REMEMBERED = 10_000

    def __init__(self, keys: JwksKeys, *, issuer: str, audience: str, leeway_s: int) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._verified: dict[str, _Verified] = {}

    async def verify(self, authorization: str | None) -> Principal:
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            known = self._verified.get(token)
            if known is not None and scheme.lower() == "bearer":
                key = await self._keys.key_for(known.kid, known.alg)
                if key is known.key and time.time() < known.expires + self._leeway:
                    return known.principal
                self._verified.pop(token, None)
        return await self._verify(authorization)

    async def _verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthorized("no bearer token", presented=False)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("not a bearer token", presented=False)
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthorized("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("malformed token") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise unauthorized("algorithm not allowed")
        if any(h in header for h in FORBIDDEN_HEADERS):
            raise unauthorized("key-bearing header refused")
        if "crit" in header:
            raise unauthorized("unsupported critical header")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise unauthorized("malformed kid")
        key = await self._keys.key_for(kid, str(alg))
        if key is None:
            raise unauthorized("unknown signing key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[str(alg)],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("token not yet valid") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"token rejected: {type(exc).__name__}") from None
        if claims["iat"] > time.time() + self._leeway:
            raise unauthorized("token issued in the future")
        principal = _principal(claims)
        if len(self._verified) >= self.MAX_REMEMBERED:
            self._verified.clear()
        self._verified[token] = _Verified(kid, str(alg), key, float(claims["exp"]), principal)
        return principal


def _principal(claims: dict[str, Any]) -> Principal:
    subject, desk, scope = claims.get("sub"), claims.get("desk"), claims.get("scope")
    if not isinstance(subject, str) or not subject:
        raise unauthorized("sub claim missing")
    if not isinstance(desk, str) or not desk:
        raise unauthorized("desk claim missing")
    if not isinstance(scope, str):
        raise unauthorized("scope claim missing")
    contracts = claims.get("contracts")
    if contracts is not None and (
        not isinstance(contracts, list) or not all(isinstance(c, str) for c in contracts)
    ):
        raise unauthorized("contracts claim malformed")
    cnf = claims.get("cnf")
    thumbprint = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    jti = claims.get("jti")
    return Principal(
        subject=subject,
        desk=desk,
        scopes=frozenset(scope.split()),
        contracts=tuple(contracts) if contracts is not None else None,
        token_id=jti if isinstance(jti, str) else None,
        cert_thumbprint=thumbprint if isinstance(thumbprint, str) else None,
    )
