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


def kafka_properties() -> dict[str, str]:
    lines = (COMPOSE.parent / "kafka" / "server.properties").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


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
        assert depends["kafka-setup"]["condition"] == "service_completed_successfully"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert svc["kafka-setup"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("kafka", "postgres", "intake", "worker", "mock-etrm"):
        assert "healthcheck" in svc[name], name
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    assert kafka_properties()["process.roles"] == "broker,controller"


def test_queued_records_survive_the_containers() -> None:
    """Kafka and Postgres write where a named volume is mounted (the Kafka image's default log
    dir is under /tmp, inside the container)."""
    svc = services()
    kafka_dir = kafka_properties()["log.dirs"]
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


def test_kafka_takes_only_authenticated_clients_over_tls_and_denies_by_default() -> None:
    props = kafka_properties()
    listeners: dict[str, str] = {}  # address -> listener name
    for part in props["listeners"].split(","):
        name, address = part.split("://", 1)
        listeners[address] = name
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    for address, name in listeners.items():
        if protocols[name] != "SASL_SSL":
            assert address.startswith("localhost:"), f"{name} reachable from outside in clear"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["auto.create.topics.enable"] == "false"
    svc = services()
    users = {}
    for name in ("intake", "worker"):
        env = svc[name]["environment"]
        assert env["ETRM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["ETRM_KAFKA_SSL_CAFILE"].endswith(".crt")
        users[name] = env["ETRM_KAFKA_SASL_USERNAME"]
        assert env["ETRM_KAFKA_SASL_PASSWORD"].startswith("${KAFKA_")
    assert users == {"intake": "etrm-intake", "worker": "etrm-worker"}


def test_acls_give_each_user_only_its_part() -> None:
    import re
    import shlex

    script = (COMPOSE.parent / "kafka" / "setup.sh").read_text()
    grants: dict[str, set[tuple[str, str]]] = {}
    for line in script.splitlines():
        if not line.strip().startswith("acl "):
            continue
        words = shlex.split(line.strip())
        principal = words[words.index("--allow-principal") + 1].replace('"', "")
        operations = [words[i + 1] for i, w in enumerate(words) if w == "--operation"]
        resource = next(w for w in words if w in ("--topic", "--group", "--cluster"))
        for operation in operations:
            grants.setdefault(principal, set()).add((operation, resource))
    grants["User:etrm-intake"] = grants.pop("User:$user", set()) | grants.get(
        "User:etrm-intake", set()
    )
    forbidden = {"Create", "Delete", "Alter", "AlterConfigs", "All", "ClusterAction"}
    for principal, allowed in grants.items():
        assert not {op for op, _ in allowed} & forbidden, principal
    assert ("Read", "--topic") not in grants["User:etrm-intake"]
    assert ("Read", "--group") in grants["User:etrm-worker"]
    assert ("Read", "--topic") not in grants["User:etrm-operator"]
    assert re.search(
        r"--add-scram \"SCRAM-SHA-512=\[name=etrm-worker,",
        (COMPOSE.parent / "kafka" / "run.sh").read_text(),
    )


def test_the_database_roles_are_least_privilege() -> None:
    svc = services()
    assert "etrm_owner:" in svc["migrate"]["environment"]["ETRM_DATABASE_URL"]
    for name in ("intake", "worker"):
        assert "etrm_app:" in svc[name]["environment"]["ETRM_DATABASE_URL"], name
    mounts = svc["postgres"]["volumes"]
    assert any("roles.sql" in m for m in mounts)
    assert any("docker-entrypoint-initdb.d" in m for m in mounts)


def test_the_scripts_parse_and_the_certificate_script_makes_a_usable_broker_certificate(
    tmp_path: Path,
) -> None:
    import shutil
    import ssl
    import subprocess

    for script in ("kafka/run.sh", "kafka/setup.sh", "postgres/roles.sh", "make-tls.sh"):
        done = subprocess.run(
            ["bash", "-n", str(COMPOSE.parent / script)], capture_output=True, check=False
        )
        assert done.returncode == 0, (script, done.stderr)
    if shutil.which("openssl") is None:
        return
    shutil.copy(COMPOSE.parent / "make-tls.sh", tmp_path / "make-tls.sh")
    done = subprocess.run(
        ["bash", str(tmp_path / "make-tls.sh")], capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "tls" / "broker.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.crt"))
    assert client.check_hostname
