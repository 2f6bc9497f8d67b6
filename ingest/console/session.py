"""Console cookies, sealed (AES-256-GCM under a key derived from the intake's encryption keys):
the browser holds them but can neither read nor forge them, and any intake process can open
them, so a session survives a restart and works behind a load balancer.

Two cookies: the sign-in cookie (state, nonce and PKCE verifier of one sign-in, 10 minutes,
`SameSite=Lax` so it comes back on the identity provider's redirect) and the session cookie
(the access token and the CSRF token, `SameSite=Strict`). Both `HttpOnly` and `Secure`.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_COOKIE = "etrm_console"
LOGIN_COOKIE = "etrm_console_login"
COOKIE_PATH = "/console"
LOGIN_TTL_S = 600
MAX_COOKIE_BYTES = 3800  # browsers keep 4 KiB per cookie, name and attributes included


def _derive(secret: bytes, purpose: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)
    return AESGCM(key)


@dataclass(frozen=True, slots=True)
class CookieSealer:
    """Seals with the first key of the keyring, opens with any (key rotation)."""

    keys: tuple[tuple[str, AESGCM], ...]

    @classmethod
    def from_keyring(cls, keyring: list[tuple[str, bytes]]) -> CookieSealer:
        return cls(
            tuple((kid, _derive(key, b"etrm-sync console cookie v1")) for kid, key in keyring)
        )

    def seal(self, name: str, data: dict[str, Any], ttl_s: float) -> str:
        kid, aead = self.keys[0]
        nonce = os.urandom(12)
        body = orjson.dumps({**data, "exp": time.time() + ttl_s})
        sealed = aead.encrypt(nonce, body, f"{name}|{kid}".encode())
        token = kid + "." + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        if len(token) > MAX_COOKIE_BYTES:
            raise ValueError("cookie too large")
        return token

    def open(self, name: str, token: str | None) -> dict[str, Any] | None:
        """The cookie's data, or None when it is absent, forged, from another cookie, or old."""
        if not token or len(token) > MAX_COOKIE_BYTES:
            return None
        kid, _, blob = token.partition(".")
        for key_id, aead in self.keys:
            if key_id != kid:
                continue
            try:
                raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
                data: dict[str, Any] = orjson.loads(
                    aead.decrypt(raw[:12], raw[12:], f"{name}|{kid}".encode())
                )
            except (InvalidTag, ValueError, binascii.Error, orjson.JSONDecodeError):
                return None
            if not isinstance(data, dict) or float(data.get("exp", 0)) < time.time():
                return None
            return data
        return None


def cookie_header(name: str, value: str, *, max_age: int, same_site: str) -> str:
    return (
        f"{name}={value}; Path={COOKIE_PATH}; Max-Age={max_age}; HttpOnly; Secure; "
        f"SameSite={same_site}"
    )


def clear_cookie(name: str) -> str:
    return f"{name}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
