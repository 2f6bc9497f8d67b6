"""Signing keys the intake trusts, one it does not, and the JWT attacks every token check must
refuse (tests/unit/test_auth.py against the verifier, tests/integration/test_security.py over
HTTP)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test.etrm-sync"  # the same as the test servers' (tests/conftest.py)
AUDIENCE = "etrm-sync-test"


class Keys:
    """Three signing keys the intake trusts (RS256, ES256, EdDSA) and one it does not."""

    def __init__(self, directory: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys = []
        for kid, public, algorithm, alg in (
            ("rsa-1", self.rsa.public_key(), RSAAlgorithm, "RS256"),
            ("ec-1", self.ec.public_key(), ECAlgorithm, "ES256"),
            ("ed-1", self.ed.public_key(), OKPAlgorithm, "EdDSA"),
        ):
            jwk = json.loads(algorithm.to_jwk(public))  # type: ignore[arg-type]
            jwk.update(kid=kid, alg=alg, use="sig")
            keys.append(jwk)
        self.path = directory / f"jwks-{uuid.uuid4().hex}.json"
        self.path.write_text(json.dumps({"keys": keys}))

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "trader-9",
            "desk": "power-east",
            "iat": now,
            "exp": now + 600,
            "scope": "settlements:write settlements:read",
            "jti": uuid.uuid4().hex,
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        alg: str = "RS256",
        kid: str | None = "rsa-1",
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        signing: Any = key or {"RS256": self.rsa, "ES256": self.ec, "EdDSA": self.ed}[alg]
        extra = dict(headers or {})
        if kid is not None:
            extra["kid"] = kid
        return jwt.encode(self.claims(**claims), signing, algorithm=alg, headers=extra)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def attacks(keys: Keys) -> dict[str, str]:
    rsa_public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header_none = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(keys.claims()).encode())
    attacker_jwk = json.loads(RSAAlgorithm.to_jwk(keys.attacker.public_key()))
    good = keys.token()
    head, _payload, signature = good.split(".")
    tampered_payload = b64(json.dumps(keys.claims(desk="gas-west")).encode())
    cases = {
        "alg none": f"{header_none}.{body}.",
        "HS256 with the RSA public key": _hs256_with(rsa_public_pem, keys),
        "unknown kid": keys.token(kid="rsa-2"),
        "injected kid": keys.token(kid="../../../../dev/null' OR '1'='1"),
        "jku header": keys.token(
            key=keys.attacker, kid="rsa-1", headers={"jku": "http://127.0.0.1:9/jwks.json"}
        ),
        "x5u header": keys.token(headers={"x5u": "http://127.0.0.1:9/cert.pem"}),
        "embedded jwk": keys.token(key=keys.attacker, kid=None, headers={"jwk": attacker_jwk}),
        "signed by an unknown key": keys.token(key=keys.attacker),
        "expired": keys.token(exp=int(time.time()) - 300, iat=int(time.time()) - 900),
        "not yet valid": keys.token(nbf=int(time.time()) + 600),
        "issued in the future": keys.token(iat=int(time.time()) + 600),
        "wrong issuer": keys.token(iss="https://evil.example"),
        "wrong audience": keys.token(aud="another-service"),
        "bad signature": f"{head}.{tampered_payload}.{signature}",
        "truncated": good[: len(good) // 2],
        "oversized": keys.token(padding="x" * 9000),
        "unknown crit": keys.token(headers={"crit": ["exp-ext"], "exp-ext": 1}),
        "ES256 header on the RSA key": keys.token(alg="ES256", kid="rsa-1", key=keys.ec),
    }
    for claim in ("iss", "aud", "sub", "exp", "iat", "desk", "scope"):
        missing: dict[str, Any] = {claim: None}
        cases[f"missing {claim}"] = keys.token(**missing)
    return cases


def _hs256_with(secret: bytes, keys: Keys) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(keys.claims()).encode())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"
