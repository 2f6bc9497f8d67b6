"""Record payloads at rest: AES-256-GCM, the key id stored beside each value.

The first key of ETRM_ENCRYPTION_KEYS encrypts; every listed key decrypts, so keys can be
rotated without downtime (`etrm-sync keys rotate` re-encrypts old rows to the newest key).
The row's id is the associated data: a ciphertext moved to another row does not decrypt.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class PayloadUnreadable(Exception):
    """Unknown key id, or a ciphertext that was altered or moved."""


class PayloadCipher:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self.active_kid = keys[0][0]
        self._keys = {kid: AESGCM(secret) for kid, secret in keys}

    def seal(self, plaintext: bytes, row_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._keys[self.active_kid].encrypt(nonce, plaintext, row_id.encode())

    def open(self, kid: str, sealed: bytes, row_id: str) -> bytes:
        key = self._keys.get(kid)
        if key is None:
            raise PayloadUnreadable(f"no key {kid!r} among ETRM_ENCRYPTION_KEYS")
        try:
            return key.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], row_id.encode())
        except InvalidTag:
            raise PayloadUnreadable("payload does not decrypt (altered or moved)") from None
