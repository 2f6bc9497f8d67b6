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
