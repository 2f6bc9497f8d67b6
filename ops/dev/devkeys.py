"""Development identity: a signing key pair, its JWKS, and tokens minted with it.

Only for `etrm-sync dev`, `etrm-sync token` and the tests; production tokens come from the
company's identity provider and etrm-sync only ever sees its public JWKS.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm

DEV_KID = "etrm-dev-es256"


def generate_signing_key(directory: Path, kid: str = DEV_KID) -> tuple[Path, Path]:
    """Write `<kid>.pem` (private, 0600) and `jwks.json` (public) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    pem_path = directory / f"{kid}.pem"
    pem_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem_path.chmod(0o600)
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, use="sig", alg="ES256")
    jwks_path = directory / "jwks.json"
    jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2))
    return pem_path, jwks_path


def algorithm_of(private_pem: bytes) -> str:
    """The JWS algorithm the intake accepts for this kind of key."""
    loaded = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(loaded, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(loaded).__name__}")


def mint_token(
    private_pem: Path | bytes,
    *,
    issuer: str,
    audience: str,
    subject: str,
    desk: str,
    scopes: Iterable[str],
    contracts: list[str] | None = None,
    ttl_s: int = 3600,
    kid: str = DEV_KID,
    algorithm: str = "ES256",
    extra_claims: dict[str, Any] | None = None,
) -> str:
    key = private_pem.read_bytes() if isinstance(private_pem, Path) else private_pem
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "desk": desk,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    if contracts is not None:
        claims["contracts"] = contracts
    claims.update(extra_claims or {})
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})
