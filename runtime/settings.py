"""One settings object for every process (CONTRACT §8).

Each process states which settings it cannot run without (`require`), so a missing or malformed
setting stops it at start with a message naming the `ETRM_` variable — never a stack trace, and
never the secret's value.
"""

from __future__ import annotations

import base64
import re
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+)\s*$")


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message names it and never shows a secret."""


def _parse_keyring(raw: str, *, name: str) -> list[tuple[str, str]]:
    """`kid=secret,kid2=secret2` -> ordered pairs; the first one is the active key."""
    pairs: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kid, sep, secret = part.partition("=")
        if not sep or not kid.strip() or not secret:
            raise ValueError(f"{name}: expected kid=secret[,kid=secret…]")
        pairs.append((kid.strip(), secret))
    if not pairs:
        raise ValueError(f"{name}: at least one key is needed")
    return pairs


def parse_rate(raw: str) -> tuple[float, int]:
    match = _RATE.match(raw)
    if not match:
        raise ValueError("expected rate_per_s:burst, e.g. 200:400")
    return float(match.group(1)), int(match.group(2))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ETRM_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_enable_idempotence: bool = True
    kafka_group_id: str = "etrm-sync-workers"
    kafka_session_timeout_ms: int = Field(10000, ge=1000)
    # Unset: a third of the session timeout, as Kafka expects (a heartbeat slower than the
    # session timeout would get every worker evicted).
    kafka_heartbeat_interval_ms: int | None = Field(None, ge=100)
    kafka_publish_timeout_s: float = Field(10.0, gt=0)
    kafka_partitions: int = Field(4, ge=1)
    topic_priority: str = "settlements.sync.priority"
    topic_standard: str = "settlements.sync.standard"
    topic_reconciliation: str = "settlements.reconciliation"

    database_url: str | None = None
    database_pool_size: int = Field(10, ge=1)

    intake_host: str = "127.0.0.1"
    intake_port: int = Field(8080, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9108, ge=0, le=65535)
    worker_concurrency: int = Field(64, ge=1, le=4096)
    worker_max_records: int = Field(500, ge=1)

    upstream_url: str | None = None
    upstream_token_url: str | None = None
    upstream_client_id: str | None = None
    upstream_client_secret: SecretStr | None = None
    upstream_signing_secret: SecretStr | None = None
    upstream_timeout_s: float = Field(10.0, gt=0)
    upstream_max_attempts: int = Field(8, ge=1)
    upstream_retry_budget_s: float = Field(900.0, gt=0)
    upstream_backoff_base_s: float = Field(0.5, ge=0)
    upstream_backoff_cap_s: float = Field(60.0, ge=0)

    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: int = Field(30, ge=0, le=30)
    jwks_refresh_cooldown_s: float = Field(30.0, ge=0)

    message_signing_keys: Annotated[SecretStr | None, NoDecode] = None
    encryption_keys: Annotated[SecretStr | None, NoDecode] = None

    audit_signing_key: Annotated[SecretStr | None, NoDecode] = None
    audit_verify_key: str | None = None
    audit_checkpoint_interval_s: float = Field(300.0, gt=0)

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    desk_rate_limit: str = "200:400"
    desk_rate_limits: str = ""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    drift_threshold: Decimal = Field(Decimal("0.005"), ge=0)
    replay_approval_threshold: int = Field(100, ge=0)
    idempotency_lease_s: float = Field(30.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must start with postgresql+asyncpg://")
        return value

    @field_validator("desk_rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("desk_rate_limits")
    @classmethod
    def _rates(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            desk, sep, rate = part.partition("=")
            if not sep or not desk:
                raise ValueError("expected desk=rate:burst[,desk=rate:burst…]")
            parse_rate(rate)
        return value

    @field_validator("message_signing_keys")
    @classmethod
    def _signing_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _parse_keyring(value.get_secret_value(), name="keys")
        return value

    @field_validator("audit_signing_key")
    @classmethod
    def _audit_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                seed = base64.b64decode(value.get_secret_value(), validate=True)
            except ValueError as exc:
                raise ValueError("must be base64 of a 32-byte Ed25519 seed") from exc
            if len(seed) != 32:
                raise ValueError("must be base64 of a 32-byte Ed25519 seed")
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _encryption_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            for _, secret in _parse_keyring(value.get_secret_value(), name="keys"):
                try:
                    raw = base64.b64decode(secret, validate=True)
                except ValueError as exc:
                    raise ValueError("each key must be base64 of 32 bytes") from exc
                if len(raw) != 32:
                    raise ValueError("each key must be base64 of 32 bytes")
        return value

    # -- derived views -------------------------------------------------------------------------

    @property
    def heartbeat_ms(self) -> int:
        if self.kafka_heartbeat_interval_ms is not None:
            return min(self.kafka_heartbeat_interval_ms, self.kafka_session_timeout_ms // 3)
        return max(100, self.kafka_session_timeout_ms // 3)

    def require(self, *names: str) -> None:
        missing = [f"ETRM_{n.upper()}" for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise SettingsError(f"missing required setting(s): {', '.join(missing)}")

    def signing_keys(self) -> list[tuple[str, bytes]]:
        self.require("message_signing_keys")
        assert self.message_signing_keys is not None
        raw = self.message_signing_keys.get_secret_value()
        return [(k, s.encode()) for k, s in _parse_keyring(raw, name="signing")]

    def encryption_keyring(self) -> list[tuple[str, bytes]]:
        self.require("encryption_keys")
        assert self.encryption_keys is not None
        raw = self.encryption_keys.get_secret_value()
        return [(k, base64.b64decode(s)) for k, s in _parse_keyring(raw, name="encryption")]

    def audit_signer(self) -> Ed25519PrivateKey | None:
        """The checkpoint signing key (base64 of a 32-byte Ed25519 seed), or None."""
        if self.audit_signing_key is None:
            return None
        seed = base64.b64decode(self.audit_signing_key.get_secret_value())
        return Ed25519PrivateKey.from_private_bytes(seed)

    def audit_verifier(self) -> Ed25519PublicKey | None:
        """The checkpoint public key: ETRM_AUDIT_VERIFY_KEY (base64, raw 32 bytes) for
        auditors, else derived from the signing key."""
        if self.audit_verify_key:
            return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.audit_verify_key))
        signer = self.audit_signer()
        return signer.public_key() if signer else None

    def desk_rates(self) -> tuple[tuple[float, int], dict[str, tuple[float, int]]]:
        overrides: dict[str, tuple[float, int]] = {}
        for part in filter(None, (p.strip() for p in self.desk_rate_limits.split(","))):
            desk, _, rate = part.partition("=")
            overrides[desk.strip()] = parse_rate(rate)
        return parse_rate(self.desk_rate_limit), overrides

    @property
    def topics(self) -> tuple[str, str]:
        return self.topic_priority, self.topic_standard

    def secret(self, name: str) -> str:
        self.require(name)
        value: Any = getattr(self, name)
        return str(value.get_secret_value() if isinstance(value, SecretStr) else value)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ETRM_ variables, to start another process with the same configuration."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        env[f"ETRM_{name.upper()}"] = str(text).lower() if isinstance(text, bool) else str(text)
    return env


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; a malformed value becomes a SettingsError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            problems.append(f"ETRM_{field.upper()}: {error['msg']}")
        raise SettingsError("invalid setting(s): " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
