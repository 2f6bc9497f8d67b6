"""The Kubernetes manifests (deploy/kubernetes) are deployable as written: parsed, every
workload probed and sized, every setting a real one, every secret key provided, the migration
a Job of its own, workers no more than a lane's partitions. (No cluster here: kubectl is not
run; these are the checks a reviewer would make by hand.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from runtime.settings import KafkaSettings, StackSettings

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def applied() -> list[dict[str, Any]]:
    kustomization = documents("kustomization.yaml")[0]
    return [d for name in kustomization["resources"] for d in documents(name)]


def containers(kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = []
    for doc in applied():
        if doc["kind"] == kind:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found.append((doc, container))
    return found


SETTINGS = {f"ETRM_{name.upper()}" for name in StackSettings.model_fields} | {"ETRM_LOG_LEVEL"}


def test_every_resource_parses_and_the_secret_example_is_not_applied() -> None:
    kinds = sorted(d["kind"] for d in applied())
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Job",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "Deployment",
            "PodDisruptionBudget",
        ]
    )
    assert "secret.example.yaml" not in documents("kustomization.yaml")[0]["resources"]
    for value in documents("secret.example.yaml")[0]["stringData"].values():
        assert value.startswith("<"), "a real secret in the repo"
        assert value.endswith(">"), "a real secret in the repo"


def test_workloads_have_probes_resources_and_run_unprivileged() -> None:
    for doc, container in containers("Deployment"):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container.get(probe), (doc["metadata"]["name"], probe)
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["limits"]["memory"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    [(_intake, container)] = [c for c in containers("Deployment") if c[1]["name"] == "intake"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


# Peak proportional set size (PSS, what the memory cgroup charges) of an intake in the bench's
# fairness row (one desk sending 5,000-record batches back to back, 2026-12-05): the serving
# process 143 MiB, each worker process that prepares big batches 150 MiB.
INTAKE_SERVING_MIB, INTAKE_PROCESS_MIB, HEADROOM = 143, 150, 1.5


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_intake_s_memory_limit_holds_its_worker_processes_at_their_peak() -> None:
    """Its worker processes default to the node's cores (at most 4), which a pod cannot see as
    its own: the manifest sets how many, and its limit holds them all preparing big batches at
    once (4 would need ~750 MiB; the limit was 512 MiB)."""
    [(_intake, container)] = [c for c in containers("Deployment") if c[1]["name"] == "intake"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    processes = int(env["ETRM_INTAKE_CPU_PROCESSES"])
    needed = HEADROOM * (INTAKE_SERVING_MIB + processes * INTAKE_PROCESS_MIB)
    assert mebibytes(container["resources"]["limits"]["memory"]) >= needed, needed
    cpu = str(container["resources"]["requests"]["cpu"])
    assert (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)) >= processes / 2


def test_settings_are_real_and_secrets_come_from_the_secret() -> None:
    config = documents("configmap.yaml")[0]["data"]
    assert set(config) <= SETTINGS, set(config) - SETTINGS
    secret_keys = set(documents("secret.example.yaml")[0]["stringData"])
    for doc in applied():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for entry in container.get("env", []):
                assert entry["name"] in SETTINGS, entry["name"]
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys, ref
                else:
                    assert "SECRET" not in entry["name"]
                    assert "KEY" not in entry["name"]


def test_migration_is_a_job_and_workers_fit_the_partitions() -> None:
    [job] = [d for d in applied() if d["kind"] == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["etrm-sync", "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    [(worker, _)] = [c for c in containers("Deployment") if c[1]["name"] == "worker"]
    assert worker["spec"]["replicas"] <= KafkaSettings().kafka_partitions
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
