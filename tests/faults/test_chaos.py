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
from tests.conftest import AUDIENCE, ISSUER, Infra, fresh_database

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
