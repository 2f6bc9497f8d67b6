"""The fault-injection run (issue #6): a seeded workload under a nemesis that kills, freezes,
adds and removes workers, kills the intake, stalls the broker past the publish timeout,
restarts PostgreSQL, flaps the upstream and injects hostile records — then a checker of I1 to I5.

CI runs 3 minutes of faults; by hand: `uv run pytest tests/faults --chaos-minutes 20` (or
`uv run etrm-sync chaos --minutes 20`). `--chaos-seed` reproduces a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.dev.chaos import Profile, chaos_settings, run_chaos
from tests.conftest import Infra, fresh_database
from tests.jwt_attacks import AUDIENCE, ISSUER

pytestmark = pytest.mark.faults


async def test_guarantees_hold_under_mixed_faults(
    infra: Infra, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    minutes: float = request.config.getoption("--chaos-minutes")
    seed: int = request.config.getoption("--chaos-seed")
    settings = chaos_settings(
        infra.broker.bootstrap,
        await fresh_database(infra),
        infra.jwks,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    report = await run_chaos(
        Profile(seed=seed, seconds=minutes * 60),
        settings=settings,
        broker=infra.broker,
        database=infra.database,
        private_key=infra.private_key,
        logs=tmp_path,
    )
    summary = report.summary()
    print(json.dumps(summary, indent=2))  # the figures, in the test log
    print("\n".join(report.events))
    assert report.accepted > 100, "the workload hardly ran"
    assert sum(report.faults.values()) >= 8, "the nemesis hardly ran"
    assert report.violations == []


async def test_a_frozen_worker_waking_as_a_zombie_under_a_flapping_upstream(
    infra: Infra, tmp_path: Path
) -> None:
    """Case 10: a worker frozen (SIGSTOP) past its session next to a live one, then woken,
    while a third of the upstream's answers are 503: its leases were taken over, its late
    writes are refused, and nothing is dead-lettered that the upstream took or sent out of
    order."""
    settings = chaos_settings(
        infra.broker.bootstrap,
        await fresh_database(infra),
        infra.jwks,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        delivery_lease_s=6.0,
    )
    report = await run_chaos(
        Profile(
            seed=10,
            seconds=45,
            faults=("freeze_worker",),
            fault_gap_s=(4.0, 6.0),
            freeze_s=(12.0, 14.0),
            base_error_rate=0.3,
        ),
        settings=settings,
        broker=infra.broker,
        database=infra.database,
        private_key=infra.private_key,
        logs=tmp_path,
    )
    print(json.dumps(report.summary(), indent=2))
    assert report.faults["freeze_worker"] >= 2
    assert report.violations == []
