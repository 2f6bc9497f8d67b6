"""Record payloads at rest: AES-256-GCM, the key id stored beside each value.

The first key of ETRM_ENCRYPTION_KEYS encrypts; every listed key decrypts, so keys can be
rotated without downtime (`etrm-sync keys rotate` re-encrypts old rows to the newest key).
The row's id is the associated data: a ciphertext moved to another row does not decrypt.

Record values on the Kafka lanes are sealed the same way when ETRM_KAFKA_ENCRYPT_PAYLOADS is on
(`LaneSealer`), bound to their message id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.envelope import ENCRYPTION_HEADER, sign_message

NONCE_BYTES = 12


class PayloadUnreadable(Exception):
    """Unknown key id, or a ciphertext that was altered or moved."""


class PayloadCipher:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self.active_kid = keys[0][0]
        self._keys = {kid: AESGCM(secret) for kid, secret in keys}
        self._material = [(kid, bytes(secret)) for kid, secret in keys]

    def __reduce__(self) -> tuple[type[PayloadCipher], tuple[list[tuple[str, bytes]]]]:
        # The intake's worker processes seal a big request's records with the same keys
        # (runtime.cpu.in_process pickles its arguments to them; nothing else pickles this).
        return (PayloadCipher, (self._material,))

    def seal(self, plaintext: bytes, row_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._keys[self.active_kid].encrypt(nonce, plaintext, row_id.encode())

    def knows(self, kid: str) -> bool:
        return kid in self._keys

    def open(self, kid: str, sealed: bytes, row_id: str) -> bytes:
        key = self._keys.get(kid)
        if key is None:
            raise PayloadUnreadable(f"no key {kid!r} among ETRM_ENCRYPTION_KEYS")
        try:
            return key.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], row_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise PayloadUnreadable("payload does not decrypt (altered or moved)") from None


# -- record values on the lanes: signed always, sealed when lane encryption is on -------------


def _lane_id(headers: Mapping[str, str]) -> str:
    # The ciphertext is bound to its message: moved under another message id it does not open.
    return "etrm-lane/v1\0" + headers.get("message_id", "")


class LaneSealer:
    """Every producer of lane records (intake, replays, continuations, hold rejections) puts a
    value on the wire through this: with a cipher the value is sealed first (under the active
    key of ETRM_ENCRYPTION_KEYS, so a reader of the topic sees no prices or positions), then the
    signature is computed over the bytes on the wire and the headers, `encryption` included."""

    def __init__(self, signing_key: tuple[str, bytes], cipher: PayloadCipher | None = None) -> None:
        self.kid, self._secret = signing_key
        self._cipher = cipher

    def seal(self, value: bytes, headers: dict[str, str]) -> bytes:
        """The value as it goes on the wire; adds `encryption` (when sealing) and `signature`
        to `headers`."""
        wire = value
        if self._cipher is not None:
            headers[ENCRYPTION_HEADER] = f"kid={self._cipher.active_kid},alg=A256GCM"
            wire = self._cipher.seal(value, _lane_id(headers))
        headers["signature"] = sign_message(wire, headers, self.kid, self._secret)
        return wire


def open_lane_value(
    wire: bytes, headers: Mapping[str, str], cipher: PayloadCipher | None
) -> bytes | str:
    """The record's value from a verified lane message: the wire bytes when not sealed, else
    the plaintext; a str says why it cannot be opened."""
    spec = headers.get(ENCRYPTION_HEADER)
    if spec is None:
        return wire
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if fields.get("alg") != "A256GCM":
        return "unknown payload encryption"
    kid = fields.get("kid", "")
    if cipher is None or not cipher.knows(kid):
        return "payload sealed under a key not in ETRM_ENCRYPTION_KEYS"
    try:
        return cipher.open(kid, wire, _lane_id(headers))
    except PayloadUnreadable:
        return "payload does not decrypt"
