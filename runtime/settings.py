"""Settings per process (CONTRACT §8): the intake, the worker and the operator's commands each
read only what they use, and what they cannot run without is a required field — so a missing or
malformed setting stops the process at start with a message naming the `ETRM_` variable, never a
stack trace and never the secret's value.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.states import Sequencing

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


def _rates(default: str, overrides: str) -> tuple[tuple[float, int], dict[str, tuple[float, int]]]:
    per_desk: dict[str, tuple[float, int]] = {}
    for part in filter(None, (p.strip() for p in overrides.split(","))):
        desk, _, rate = part.partition("=")
        per_desk[desk.strip()] = parse_rate(rate)
    return parse_rate(default), per_desk


def _signing_keyring(value: SecretStr) -> list[tuple[str, bytes]]:
    return [(k, s.encode()) for k, s in _parse_keyring(value.get_secret_value(), name="signing")]


def _encryption_keyring(value: SecretStr) -> list[tuple[str, bytes]]:
    pairs = _parse_keyring(value.get_secret_value(), name="encryption")
    return [(k, base64.b64decode(s)) for k, s in pairs]


KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ETRM_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )


class KafkaSettings(_Settings):
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_enable_idempotence: bool = True
    kafka_group_id: str = "etrm-sync-workers"
    kafka_session_timeout_ms: int = Field(10000, ge=1000)
    # Whether a worker's consumers send LeaveGroup when they stop. Off by default, as in Kafka
    # Streams: a stopped worker's partitions move once its session times out. Tansu 0.6 keeps a
    # member that leaves a re-forming group as that group's leader for ever, and no worker of
    # the group is assigned anything again (workers.app.StayingConsumer); on Apache Kafka it is
    # safe to turn on for faster hand-overs on a rolling restart.
    kafka_leave_group_on_stop: bool = False
    # Unset: a third of the session timeout, as Kafka expects (a heartbeat slower than the
    # session timeout would get every worker evicted).
    kafka_heartbeat_interval_ms: int | None = Field(None, ge=100)
    kafka_publish_timeout_s: float = Field(10.0, gt=0)
    kafka_partitions: int = Field(4, ge=1)
    topic_priority: str = "settlements.sync.priority"
    topic_standard: str = "settlements.sync.standard"
    topic_reconciliation: str = "settlements.reconciliation"
    # Authentication and encryption to the broker, for every client (intake, workers, operator
    # commands). SASL passwords travel only over TLS, except SCRAM (a challenge, never the
    # password) — PLAIN over SASL_PLAINTEXT is refused.
    kafka_security_protocol: KafkaProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None  # unset: the system's trusted CAs
    kafka_ssl_certfile: str | None = None  # a client certificate, for brokers that ask for one
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _kafka_security(self) -> KafkaSettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                "ETRM_KAFKA_SASL_USERNAME and ETRM_KAFKA_SASL_PASSWORD are needed for "
                f"{self.kafka_security_protocol}"
            )
        if (
            self.kafka_security_protocol == "SASL_PLAINTEXT"
            and self.kafka_sasl_mechanism == "PLAIN"
        ):
            raise ValueError("SASL PLAIN would send the password in clear: use SASL_SSL")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("ETRM_KAFKA_SSL_CERTFILE and ETRM_KAFKA_SSL_KEYFILE go together")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"ETRM_{name.upper()}: no such file {path}")
        return self

    @property
    def kafka_uses_tls(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    @property
    def heartbeat_ms(self) -> int:
        if self.kafka_heartbeat_interval_ms is not None:
            return min(self.kafka_heartbeat_interval_ms, self.kafka_session_timeout_ms // 3)
        return max(100, self.kafka_session_timeout_ms // 3)

    @property
    def lanes(self) -> dict[str, str]:
        return {"priority": self.topic_priority, "standard": self.topic_standard}

    @property
    def all_topics(self) -> list[str]:
        return [self.topic_priority, self.topic_standard, self.topic_reconciliation]


class DatabaseSettings(_Settings):
    database_url: str
    database_pool_size: int = Field(20, ge=1)
    # The server ends a session of ours that stays idle inside a transaction this long
    # (idle_in_transaction_session_timeout): its process froze or hung holding locks — the
    # audit sequencer's turn, a request's key and batch rows, dead letters being published —
    # which would otherwise keep every other process behind them until it thawed. Longer than
    # anything we wait for inside a transaction (the dead-letter outbox's publish, bounded by
    # ETRM_KAFKA_PUBLISH_TIMEOUT_S; checked below where both are set).
    database_idle_in_transaction_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _idle_outlasts_a_publish(self) -> DatabaseSettings:
        publish_s = getattr(self, "kafka_publish_timeout_s", None)
        if publish_s is not None and self.database_idle_in_transaction_s <= 2 * publish_s:
            raise ValueError(
                "ETRM_DATABASE_IDLE_IN_TRANSACTION_S must be more than twice "
                "ETRM_KAFKA_PUBLISH_TIMEOUT_S (the outbox publishes inside a transaction)"
            )
        return self

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must start with postgresql+asyncpg://")
        return value


class _Keys(_Settings):
    message_signing_keys: Annotated[SecretStr, NoDecode]
    encryption_keys: Annotated[SecretStr, NoDecode]
    audit_signing_key: Annotated[SecretStr | None, NoDecode] = None
    audit_verify_key: str | None = None
    audit_checkpoint_interval_s: float = Field(300.0, gt=0)
    # `audit verify` (with a key) fails when chain rows older than this are not covered by a
    # signed checkpoint: a deleted, stale or bypassed checkpoint is a finding.
    audit_checkpoint_max_age_s: float = Field(900.0, gt=0)
    # Signed checkpoints are also appended here (outside the database; e.g. a WORM mount), and
    # `audit verify` checks each against the chain.
    audit_checkpoint_dir: str | None = None
    # Seal record values on the lanes with the active key of ETRM_ENCRYPTION_KEYS, so a reader
    # of the topics sees no prices or positions (workers open sealed values whatever this is).
    kafka_encrypt_payloads: bool = False

    @field_validator("message_signing_keys")
    @classmethod
    def _signing_keys(cls, value: SecretStr) -> SecretStr:
        _parse_keyring(value.get_secret_value(), name="keys")
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _encryption_keys(cls, value: SecretStr) -> SecretStr:
        for _, secret in _parse_keyring(value.get_secret_value(), name="keys"):
            try:
                raw = base64.b64decode(secret, validate=True)
            except ValueError as exc:
                raise ValueError("each key must be base64 of 32 bytes") from exc
            if len(raw) != 32:
                raise ValueError("each key must be base64 of 32 bytes")
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

    def signing_keys(self) -> list[tuple[str, bytes]]:
        return _signing_keyring(self.message_signing_keys)

    def encryption_keyring(self) -> list[tuple[str, bytes]]:
        return _encryption_keyring(self.encryption_keys)

    def audit_signer(self) -> Ed25519PrivateKey | None:
        """The checkpoint signing key (base64 of a 32-byte Ed25519 seed), or None."""
        if self.audit_signing_key is None:
            return None
        seed = base64.b64decode(self.audit_signing_key.get_secret_value())
        return Ed25519PrivateKey.from_private_bytes(seed)

    def checkpoint_dir(self) -> Path | None:
        return Path(self.audit_checkpoint_dir) if self.audit_checkpoint_dir else None

    def audit_verifier(self) -> Ed25519PublicKey | None:
        """ETRM_AUDIT_VERIFY_KEY (base64, raw 32 bytes) for auditors, else derived."""
        if self.audit_verify_key:
            return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.audit_verify_key))
        signer = self.audit_signer()
        return signer.public_key() if signer else None


class _Delivery(_Settings):
    """What intake, workers and operators must agree on about delivery order."""

    sequence_dead_letters: Sequencing = Sequencing.OFF
    replay_approval_threshold: int = Field(100, ge=0)
    # How long an acceptance may stay pending (broker acknowledging) before it counts as
    # aborted; a little more than the publish timeout.
    acceptance_grace_s: float = Field(5.0, gt=0)
    # Idempotency keys are forgotten after this many hours (the IETF Idempotency-Key draft
    # suggests 24 h). A retry after that is still safe: its records' ids are derived from their
    # content, so records accepted before are not published again.
    idempotency_retention_h: float = Field(24.0, gt=0)


class _Metrics(_Settings):
    # /metrics names desks and their volumes: with a token set, a scrape must present it
    # (`Authorization: Bearer …`, Prometheus' `authorization` scrape setting). Off by default.
    metrics_token: SecretStr | None = None

    def metrics_allowed(self, authorization: str | None) -> bool:
        if self.metrics_token is None:
            return True
        expected = f"Bearer {self.metrics_token.get_secret_value()}".encode()
        return hmac.compare_digest(expected, (authorization or "").encode())


class IntakeSettings(KafkaSettings, DatabaseSettings, _Keys, _Delivery, _Metrics):
    intake_host: str = "127.0.0.1"
    intake_port: int = Field(8080, ge=0, le=65535)
    # How long the intake waits for the database on a read, a readiness check, or the step
    # before publishing, then answers 503 (nothing accepted): a stalled database host must not
    # hold the desks' connections open without an answer. Never applied after the publish,
    # where the outcome must be learnt, not guessed.
    database_timeout_s: float = Field(5.0, gt=0)
    jwks_url: str
    jwt_issuer: str
    jwt_audience: str
    jwt_leeway_s: int = Field(30, ge=0, le=30)
    jwks_refresh_cooldown_s: float = Field(30.0, ge=0)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    desk_rate_limit: str = "200:400"
    desk_rate_limits: str = ""
    # Records per second per desk besides requests (a 5,000-record batch is one request but
    # 5,000 records of work): one desk's big batches cannot take the intake from the others.
    desk_record_rate_limit: str = "20000:40000"
    desk_record_rate_limits: str = ""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Worker processes (niced) that parse and validate big batch bodies, so one desk's big
    # batches do not hold the event loop's GIL while other desks wait; 0: a thread instead.
    intake_cpu_processes: int = Field(min(os.cpu_count() or 1, 4), ge=0, le=64)
    # A client that takes longer than this to send its body gets a 408 and loses the
    # connection: a slow sender cannot hold a connection and a request slot for ever.
    body_read_timeout_s: float = Field(30.0, gt=0)
    idempotency_lease_s: float = Field(30.0, gt=0)
    # The operations console (/console): OpenID Connect sign-in (authorization code + PKCE) at
    # this issuer for this public client. Unset: the console is off (404).
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_scopes: str = "openid ops:read ops:replay ops:holds ops:upstream"
    # How browsers reach the intake (the console's sign-in redirect URI and its origin check);
    # unset: http(s)://<intake host>:<port> as configured.
    public_base_url: str | None = None

    @field_validator("oidc_issuer", "public_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return value.rstrip("/") if value else value

    @property
    def console_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    def public_base(self) -> str:
        if self.public_base_url:
            return self.public_base_url
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.intake_host}:{self.intake_port}"

    @field_validator("desk_rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("desk_record_rate_limit")
    @classmethod
    def _record_rate(cls, value: str) -> str:
        parse_rate(value)  # a batch larger than the burst waits for a full bucket
        return value

    @field_validator("desk_rate_limits", "desk_record_rate_limits")
    @classmethod
    def _rates(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            desk, sep, rate = part.partition("=")
            if not sep or not desk:
                raise ValueError("expected desk=rate:burst[,desk=rate:burst…]")
            parse_rate(rate)
        return value

    def desk_rates(self) -> tuple[tuple[float, int], dict[str, tuple[float, int]]]:
        return _rates(self.desk_rate_limit, self.desk_rate_limits)

    def desk_record_rates(self) -> tuple[tuple[float, int], dict[str, tuple[float, int]]]:
        return _rates(self.desk_record_rate_limit, self.desk_record_rate_limits)

    @property
    def pending_lease_s(self) -> float:
        return self.kafka_publish_timeout_s + self.acceptance_grace_s


class WorkerSettings(KafkaSettings, DatabaseSettings, _Keys, _Delivery, _Metrics):
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9108, ge=0, le=65535)
    worker_concurrency: int = Field(64, ge=1, le=4096)
    worker_max_records: int = Field(500, ge=1)
    upstream_url: str
    upstream_token_url: str
    upstream_client_id: str
    upstream_client_secret: SecretStr
    upstream_signing_secret: SecretStr
    upstream_timeout_s: float = Field(10.0, gt=0)
    upstream_max_attempts: int = Field(8, ge=1)
    upstream_retry_budget_s: float = Field(900.0, gt=0)
    upstream_backoff_base_s: float = Field(0.5, ge=0)
    upstream_backoff_cap_s: float = Field(60.0, ge=0)
    drift_threshold: Decimal = Field(Decimal("0.005"), ge=0)
    delivery_lease_s: float = Field(60.0, gt=0)
    breaker_failures: int = Field(20, ge=1)
    breaker_window_s: float = Field(30.0, gt=0)
    breaker_probe_interval_s: float = Field(5.0, gt=0)
    # A 503 asking to come back at least this much later announces a maintenance: the breaker
    # opens until then at once, instead of each record spending its budget on it.
    upstream_announced_outage_s: float = Field(60.0, gt=0)
    priority_share: float = Field(0.8, gt=0, le=1)


class OperatorSettings(KafkaSettings, DatabaseSettings, _Keys, _Delivery):
    """The `etrm-sync dlq|holds|audit|keys` commands."""


class OperatorApiSettings(_Settings):
    """With these, operators' state-changing commands go through the intake's HTTP API with the
    operator's own token: the API's scopes apply and the actor is the token's subject."""

    api_url: str | None = None
    operator_token: SecretStr | None = None
    operator_token_file: str | None = None  # e.g. written by your identity provider's CLI

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return value.rstrip("/") if value else value

    def token(self) -> str | None:
        if self.operator_token is not None:
            return self.operator_token.get_secret_value().strip() or None
        if self.operator_token_file:
            try:
                return Path(self.operator_token_file).read_text().strip() or None
            except OSError as exc:
                raise SettingsError(
                    f"invalid setting(s): ETRM_OPERATOR_TOKEN_FILE: cannot read it "
                    f"({type(exc).__name__})"
                ) from None
        return None


class StackSettings(IntakeSettings, WorkerSettings):  # type: ignore[misc]  # pydantic internals
    """Everything one machine runs at once: the dev stack, the test suite and the bench."""


S = TypeVar("S", bound=_Settings)


def load(kind: type[S], **overrides: Any) -> S:
    """Read the environment; a missing or malformed value becomes a SettingsError naming the
    variable (and never its value)."""
    try:
        return kind(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            message = "required but not set" if error["type"] == "missing" else error["msg"]
            problems.append(f"ETRM_{field.upper()}: {message}")
        raise SettingsError("invalid setting(s): " + "; ".join(problems)) from None


def settings_env(settings: _Settings) -> dict[str, str]:
    """The settings as ETRM_ variables, to start another process with the same configuration."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        env[f"ETRM_{name.upper()}"] = str(text).lower() if isinstance(text, bool) else str(text)
    return env
