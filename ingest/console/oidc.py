"""OpenID Connect sign-in for the console: discovery, the authorization request with PKCE
(S256), the code exchange and the ID token's checks (OpenID Connect Core §3.1.3.7).

The access token the identity provider returns is then verified exactly as the API verifies a
bearer token (ingest.auth.TokenVerifier): the console grants what the API would grant.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from ingest.auth import ALLOWED_ALGORITHMS, FORBIDDEN_HEADERS, JwksKeys


class SignInFailed(Exception):
    """Sign-in cannot go on; the message is safe to show (no token, no secret)."""


@dataclass(frozen=True, slots=True)
class Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None


@dataclass(frozen=True, slots=True)
class SignIn:
    """One sign-in in flight: kept sealed in the browser's sign-in cookie."""

    state: str
    nonce: str
    verifier: str
    next_path: str

    @classmethod
    def start(cls, next_path: str) -> SignIn:
        return cls(
            secrets.token_urlsafe(24),
            secrets.token_urlsafe(24),
            secrets.token_urlsafe(48),  # RFC 7636: 43..128 characters
            next_path,
        )

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    subject: str


class OidcClient:
    def __init__(
        self, issuer: str, client_id: str, scopes: str, redirect_uri: str, *, leeway_s: int = 30
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.scopes = scopes
        self.redirect_uri = redirect_uri
        self._leeway = leeway_s
        self._provider: Provider | None = None
        self._loaded_at = 0.0
        self._keys: JwksKeys | None = None
        self._lock = asyncio.Lock()

    async def provider(self) -> Provider:
        async with self._lock:
            if self._provider is None or time.monotonic() - self._loaded_at > 3600:
                self._provider = await self._discover()
                self._keys = JwksKeys(self._provider.jwks_uri)
                self._loaded_at = time.monotonic()
            return self._provider

    async def _discover(self) -> Provider:
        url = f"{self.issuer}/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(timeout=5.0) as http:
                response = await http.get(url)
                response.raise_for_status()
                doc = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed(
                f"the identity provider is unreachable ({type(exc).__name__})"
            ) from None
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            raise SignInFailed("the identity provider's discovery document names another issuer")
        try:
            return Provider(
                issuer=doc["issuer"],
                authorization_endpoint=str(doc["authorization_endpoint"]),
                token_endpoint=str(doc["token_endpoint"]),
                jwks_uri=str(doc["jwks_uri"]),
                end_session_endpoint=doc.get("end_session_endpoint"),
            )
        except KeyError as exc:
            raise SignInFailed(f"the discovery document lacks {exc.args[0]}") from None

    async def authorization_url(self, sign_in: SignIn, *, login_hint: str | None = None) -> str:
        provider = await self.provider()
        hint = {"login_hint": login_hint} if login_hint else {}
        query = urlencode(
            {
                **hint,
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": self.scopes,
                "state": sign_in.state,
                "nonce": sign_in.nonce,
                "code_challenge": sign_in.challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in provider.authorization_endpoint else "?"
        return f"{provider.authorization_endpoint}{sep}{query}"

    async def redeem(self, sign_in: SignIn, *, state: str, code: str) -> Tokens:
        """Exchange the code (with the PKCE verifier) and check the ID token."""
        if not hmac.compare_digest(state.encode(), sign_in.state.encode()):
            raise SignInFailed("the sign-in state does not match; start again")
        provider = await self.provider()
        try:
            async with httpx.AsyncClient(timeout=10.0) as http:
                response = await http.post(
                    provider.token_endpoint,
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": self.redirect_uri,
                        "client_id": self.client_id,
                        "code_verifier": sign_in.verifier,
                    },
                    headers={"Accept": "application/json"},
                )
        except httpx.HTTPError as exc:
            raise SignInFailed(
                f"the identity provider is unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise SignInFailed(f"the identity provider refused the code ({response.status_code})")
        try:
            body: Any = response.json()
        except ValueError:
            raise SignInFailed("the identity provider answered something other than JSON") from None
        if not isinstance(body, dict):
            raise SignInFailed("the identity provider answered something other than an object")
        id_token, access_token = body.get("id_token"), body.get("access_token")
        if not isinstance(id_token, str) or not isinstance(access_token, str):
            raise SignInFailed("the identity provider gave no ID token or no access token")
        claims = await self._check_id_token(id_token, sign_in.nonce)
        return Tokens(access_token=access_token, subject=str(claims["sub"]))

    async def _check_id_token(self, token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise SignInFailed("the ID token is malformed") from None
        alg = str(header.get("alg"))
        if alg not in ALLOWED_ALGORITHMS or any(h in header for h in FORBIDDEN_HEADERS):
            raise SignInFailed("the ID token's algorithm or header is not accepted")
        assert self._keys is not None
        kid = header.get("kid")
        key = await self._keys.key_for(kid if isinstance(kid, str) else None, alg)
        if key is None:
            raise SignInFailed("the ID token is signed with an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.client_id,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["iss", "aud", "sub", "exp", "iat"]},
            )
        except jwt.PyJWTError as exc:
            raise SignInFailed(f"the ID token is not valid ({type(exc).__name__})") from None
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
            raise SignInFailed("the ID token's nonce does not match this sign-in")
        return claims
