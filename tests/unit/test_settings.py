"""Settings per process: a missing or malformed value stops a process at start, naming the
variable and never showing a secret (CONTRACT §8)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import structlog

from runtime.settings import (
    IntakeSettings,
    KafkaSettings,
    OperatorSettings,
    SettingsError,
    WorkerSettings,
    load,
)

BASE = {
    "database_url": "postgresql+asyncpg://u@h/db",
    "message_signing_keys": "k1=s1",
    "encryption_keys": "e1=" + "A" * 43 + "=",
}


def test_required_settings_are_named_per_process() -> None:
    with pytest.raises(SettingsError) as intake:
        load(IntakeSettings, **BASE)
    assert "ETRM_JWKS_URL" in str(intake.value)
    assert "ETRM_UPSTREAM_URL" not in str(intake.value)  # not the intake's business
    with pytest.raises(SettingsError) as worker:
        load(WorkerSettings, **BASE)
    assert "ETRM_UPSTREAM_URL" in str(worker.value)
    assert "ETRM_JWKS_URL" not in str(worker.value)
    operator = load(OperatorSettings, **BASE)
    assert operator.database_url == BASE["database_url"]


def test_malformed_secret_is_named_but_not_shown() -> None:
    with pytest.raises(SettingsError) as caught:
        load(OperatorSettings, **{**BASE, "encryption_keys": "k1=not-base64-SECRETVALUE"})
    assert "ETRM_ENCRYPTION_KEYS" in str(caught.value)
    assert "SECRETVALUE" not in str(caught.value)
    with pytest.raises(SettingsError, match="ETRM_DATABASE_URL"):
        load(OperatorSettings, **{**BASE, "database_url": "sqlite:///nope.db"})


def test_heartbeat_follows_the_session_timeout() -> None:
    assert KafkaSettings(kafka_session_timeout_ms=2000).heartbeat_ms == 666
    assert KafkaSettings(kafka_session_timeout_ms=10000).heartbeat_ms == 3333
    explicit = KafkaSettings(kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500)
    assert explicit.heartbeat_ms == 500


def test_a_session_idle_in_a_transaction_outlasts_the_outbox_publish() -> None:
    """The dead-letter outbox publishes inside a transaction, so the server must not end a
    session for idling in one before that publish has had its time (twice its bound)."""
    operator = load(OperatorSettings, **BASE)
    assert operator.database_idle_in_transaction_s == 60.0
    assert operator.kafka_publish_timeout_s == 10.0
    with pytest.raises(SettingsError) as short:
        load(OperatorSettings, **BASE, database_idle_in_transaction_s=20.0)
    assert "ETRM_DATABASE_IDLE_IN_TRANSACTION_S" in str(short.value)
    load(OperatorSettings, **BASE, database_idle_in_transaction_s=5.0, kafka_publish_timeout_s=2.0)


def test_keyrings() -> None:
    settings = load(OperatorSettings, **{**BASE, "message_signing_keys": "new=s2,old=s1"})
    assert settings.signing_keys() == [("new", b"s2"), ("old", b"s1")]


@pytest.mark.parametrize("command", ["worker", "intake", "migrate"])
def test_process_refuses_to_start_without_its_settings(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETRM_")}
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    assert done.returncode == 2
    assert "ETRM_DATABASE_URL" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_log_level_is_a_setting_like_any_other(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.logging import configure_logging

    monkeypatch.setenv("ETRM_LOG_LEVEL", "loud")
    with pytest.raises(SettingsError, match="ETRM_LOG_LEVEL"):
        configure_logging("worker")
    monkeypatch.setenv("ETRM_LOG_LEVEL", "debug")
    try:
        configure_logging("worker")
        assert structlog.get_config()["wrapper_class"].__name__.endswith("AtDebug")
    finally:
        structlog.reset_defaults()


def test_kafka_security_settings_are_checked_and_reach_every_client() -> None:
    from faststream.security import SASLScram512

    from runtime.kafka import client_options, faststream_security

    with pytest.raises(SettingsError) as no_credentials:
        load(KafkaSettings, kafka_security_protocol="SASL_SSL")
    assert "ETRM_KAFKA_SASL_USERNAME" in str(no_credentials.value)
    with pytest.raises(SettingsError) as clear:
        load(
            KafkaSettings,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="intake",
            kafka_sasl_password="hunter2-secret",
        )
    assert "use SASL_SSL" in str(clear.value)
    assert "hunter2-secret" not in str(clear.value)
    with pytest.raises(SettingsError):
        load(KafkaSettings, kafka_security_protocol="TLS")  # not a protocol Kafka knows
    with pytest.raises(SettingsError) as missing:
        load(KafkaSettings, kafka_security_protocol="SSL", kafka_ssl_cafile="/nowhere/ca.pem")
    assert "/nowhere/ca.pem" in str(missing.value)

    assert client_options(load(KafkaSettings)) == {"security_protocol": "PLAINTEXT"}
    assert faststream_security(load(KafkaSettings)) is None
    sasl = load(
        KafkaSettings,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="etrm-worker",
        kafka_sasl_password="s3cret-pass",
    )
    options = client_options(sasl)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "etrm-worker",
        "s3cret-pass",
    )
    assert options["ssl_context"].check_hostname
    assert "s3cret-pass" not in repr(sasl)
    security = faststream_security(sasl)
    assert isinstance(security, SASLScram512)
    assert security.use_ssl
