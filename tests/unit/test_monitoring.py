"""The alert rules and the Grafana dashboard under deploy/ parse, behave as their unit tests say,
and name only series the intake and the workers export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import ingest.metrics
import workers.metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "etrm-sync.json"
SERIES = re.compile(r"\betrm_[a-z0-9_]+")

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported() -> set[str]:
    """Every sample name our processes can export (labelled series included before their
    first child exists)."""
    assert ingest.metrics.ACCEPTED is not None  # imported for its registrations
    assert workers.metrics.DELIVERIES is not None
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def rule_expressions() -> list[str]:
    document = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_expressions() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("ETRM_REQUIRE_TOOLS"):
            pytest.fail("promtool is required here (apt-get install prometheus)")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return found


def passes_promtool(*args: str, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [promtool(), *args], check=False, capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_promtool_check() -> None:
    passes_promtool("check", "rules", str(RULES))


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    passes_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query as a recording rule ($__rate_interval as 5m)."""
    rules = [
        {"record": f"dashboard:panel_query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(panel_expressions())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    passes_promtool("check", "rules", str(path))


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_series_named_is_exported(source: str) -> None:
    expressions = rule_expressions() if source == "rules" else panel_expressions()
    named = {m for e in expressions for m in SERIES.findall(e)}
    assert named, "no etrm_* series found: the pattern or the file is wrong"
    missing = named - exported()
    assert not missing, f"{source} name series nobody exports: {sorted(missing)}"


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"] for v in board["templating"]["list"]}
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, p["title"]
        assert p["title"], p
        assert p["targets"], p["title"]
        uid = p["datasource"]["uid"]
        assert uid.startswith("${"), f"{p['title']}: {uid}"
        assert uid[2:-1] in variables, f"{p['title']}: {uid}"
        grid = p["gridPos"]
        assert grid["x"] >= 0, p["title"]
        assert grid["x"] + grid["w"] <= 24, f"{p['title']} leaves the grid"
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        assert all(t["expr"] for t in p["targets"]), p["title"]


def test_the_issue_names_are_covered() -> None:
    """Throughput, end-to-end latency, lag, outcomes by reason, holds, dead letters, upstream
    latency by status on the board; the six alert families in the rules."""
    queries = " ".join(panel_expressions())
    for series in (
        "etrm_intake_records_accepted_total",
        "etrm_end_to_end_seconds_bucket",
        "etrm_worker_consumer_lag",
        "etrm_worker_dead_letters_total",
        "etrm_holds_open",
        "etrm_dead_letters_open",
        "etrm_worker_upstream_latency_seconds_bucket",
    ):
        assert series in queries, series
    alerts = " ".join(rule_expressions())
    for series in (
        "etrm_oldest_undelivered_age_seconds",
        "etrm_worker_consumer_lag",
        "etrm_worker_dead_letters_total",
        "etrm_worker_token_failures_total",
        "etrm_intake_auth_failures_total",
        'up{job="etrm-worker"}',
    ):
        assert series in alerts, series
