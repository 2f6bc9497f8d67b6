"""No Docker engine runs here, so the compose file is checked against the code instead: every
command exists, every ETRM_ variable is a real setting, every required setting is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer.main
import yaml

from ops.cli import app
from runtime.settings import DatabaseSettings, IntakeSettings, StackSettings, WorkerSettings

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"


def required(kind: type[Any]) -> tuple[str, ...]:
    return tuple(name for name, field in kind.model_fields.items() if field.is_required())


REQUIRED = {
    "intake": required(IntakeSettings),
    "worker": required(WorkerSettings),
    "migrate": required(DatabaseSettings),
}


def services() -> dict[str, Any]:
    loaded: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())
    return loaded["services"]


def test_every_command_exists() -> None:
    cli: Any = typer.main.get_command(app)
    ours = {n: s for n, s in services().items() if "build" in s}
    assert set(ours) == {"migrate", "mock-etrm", "intake", "worker"}
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "etrm-sync", name
        sub = cli.commands.get(command[1])
        assert sub is not None, f"{name}: no such command {command[1]}"
        options = {o for p in sub.params for o in getattr(p, "opts", [])}
        for arg in command[2:]:
            if arg.startswith("--"):
                assert arg in options, f"{name}: {command[1]} has no option {arg}"


def test_every_etrm_variable_is_a_setting_and_required_ones_are_set() -> None:
    fields = set(StackSettings.model_fields)
    for name, service in services().items():
        env = service.get("environment", {})
        for variable in env:
            if variable.startswith("ETRM_"):
                assert variable[5:].lower() in fields, f"{name}: {variable} is not a setting"
        command = service.get("command", [])
        role = command[1] if len(command) > 1 else None
        for required in REQUIRED.get(role or "", ()):
            assert f"ETRM_{required.upper()}" in env, f"{name} lacks ETRM_{required.upper()}"


def test_startup_is_gated_on_health() -> None:
    svc = services()
    for name in ("intake", "worker"):
        depends = svc[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "postgres", "intake", "worker", "mock-etrm"):
        assert "healthcheck" in svc[name], name
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    assert svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_queued_records_survive_the_containers() -> None:
    """Kafka and Postgres write where a named volume is mounted (the Kafka image's default log
    dir is under /tmp, inside the container)."""
    svc = services()
    kafka_dir = svc["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.split(":", 1)[1] == kafka_dir for v in svc["kafka"]["volumes"])
    assert any(v.split(":", 1)[1] == "/var/lib/postgresql/data" for v in svc["postgres"]["volumes"])


def test_the_image_is_named_and_carries_every_package_the_product_runs() -> None:
    import tomllib

    svc = services()
    for name, service in svc.items():
        if "build" in service:
            assert service["image"].startswith("etrm-sync:"), name
    root = COMPOSE.parents[1]
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    copied = {
        line.split()[1]
        for line in (COMPOSE.parent / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and not line.startswith("COPY pyproject")
    }
    assert set(packages) <= copied, f"the image lacks {sorted(set(packages) - copied)}"
    ignored = (root / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", ".env", "*.pem"} <= set(ignored)
