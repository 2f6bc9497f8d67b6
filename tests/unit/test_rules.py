"""Delivery rules: status classification (every status of CONTRACT §4), backoff, revisions,
drift — and the upstream client against the simulator in memory (no servers)."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import httpx
import pytest

from ops.simulator import SimConfig, SimState, create_simulator
from workers.rules import (
    Verdict,
    backoff_delay,
    classify,
    drift,
    is_superseded,
    parse_position,
    retry_after_seconds,
)
from workers.upstream import TokenProvider, UpstreamClient

TXN = {"transaction_id": "TX-1"}


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (201, TXN, Verdict.DELIVERED),
        (200, TXN, Verdict.DELIVERED),
        (409, TXN, Verdict.DELIVERED),
        (409, {"error": "conflict"}, Verdict.PERMANENT),
        (201, {}, Verdict.PERMANENT),
        (400, {}, Verdict.PERMANENT),
        (404, {}, Verdict.PERMANENT),
        (422, {}, Verdict.PERMANENT),
        (301, {}, Verdict.PERMANENT),
        (302, {}, Verdict.PERMANENT),
        (307, {}, Verdict.PERMANENT),
        (401, {}, Verdict.UNAUTHORIZED),
        (408, {}, Verdict.TRANSIENT),
        (425, {}, Verdict.TRANSIENT),
        (429, {}, Verdict.TRANSIENT),
        (500, {}, Verdict.TRANSIENT),
        (502, {}, Verdict.TRANSIENT),
        (503, {}, Verdict.TRANSIENT),
        (504, {}, Verdict.TRANSIENT),
        (403, {}, Verdict.PERMANENT),
        (501, {}, Verdict.PERMANENT),
    ],
)
def test_classification(status: int, body: dict[str, str], verdict: Verdict) -> None:
    assert classify(status, body) is verdict


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        delays = [
            backoff_delay(attempt, base=0.5, cap=60, retry_after=None, rng=rng) for _ in range(200)
        ]
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling * 0.2  # full jitter reaches near zero
    assert backoff_delay(1, base=0.5, cap=60, retry_after=7, rng=rng) >= 7
    assert backoff_delay(1, base=0.5, cap=60, retry_after=10_000, rng=rng) <= 60


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3", now=0) == 3
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("soon", now=0) is None
    assert retry_after_seconds(None, now=0) is None


def test_revision_rule() -> None:
    assert is_superseded(1, 2)
    assert not is_superseded(2, 2)
    assert not is_superseded(3, 2)
    assert not is_superseded(1, None)


def test_drift_threshold() -> None:
    threshold = Decimal("0.005")
    assert drift(Decimal(100), Decimal("100.5"), threshold) is None
    assert drift(Decimal(100), Decimal("100.501"), threshold) == Decimal("0.501")
    assert drift(Decimal(-100), Decimal("-99.4"), threshold) == Decimal("0.6")
    assert drift(Decimal(0), Decimal("0.001"), threshold) == Decimal("0.001")


def test_reconciled_position_number_or_string() -> None:
    assert parse_position("12.345") == Decimal("12.345")
    assert parse_position(Decimal("12.5")) == Decimal("12.5")
    assert parse_position(12) == Decimal(12)
    assert parse_position("NaN") is None
    assert parse_position(None) is None


def _client(**sim: Any) -> tuple[UpstreamClient, SimState]:
    app = create_simulator(SimConfig(client_id="c", client_secret="s", signing_secret="sig", **sim))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")
    tokens = TokenProvider(http, "http://sim/oauth/token", "c", "s")
    client = UpstreamClient(
        http,
        tokens,
        base_url="http://sim",
        signing_secret="sig",
        max_attempts=4,
        budget_s=5,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
    )
    return client, app.state.sim


BODY = b'{"contract_id":"OTC-1","position_mwh":"10.000","revision":1}'


async def test_upstream_protocol_with_simulator() -> None:
    client, sim = _client(fail_first_attempts=2)
    result = await client.deliver(BODY, "m-1", "trace")
    assert result.outcome == "delivered"
    assert result.attempts == 3
    again = await client.deliver(BODY, "m-1", "trace")
    assert again.outcome == "delivered"
    assert again.transaction_id == result.transaction_id
    assert sim.duplicate_posts == 1
    assert len(sim.effects) == 1
    assert sim.tokens_issued == 1


async def test_expired_token_is_renewed_once_on_401() -> None:
    client, sim = _client()
    await client.deliver(BODY, "m-1", "trace")
    sim.tokens.clear()
    result = await client.deliver(BODY, "m-2", "trace")
    assert result.outcome == "delivered"
    assert result.attempts == 2
    assert sim.tokens_issued == 2


async def test_token_endpoint_down_is_token_unavailable() -> None:
    client, _ = _client(token_outage=True)
    result = await client.deliver(BODY, "m-1", "trace")
    assert result.outcome == "token_unavailable"
    assert result.attempts == 4


async def test_budget_stops_retries() -> None:
    client, _sim = _client(outage=True, retry_after_s=1)
    client._budget = 1.5
    client._cap = 5.0
    result = await client.deliver(BODY, "m-1", "trace")
    assert result.outcome == "retries_exhausted"
    assert result.attempts == 2  # a third would wait past the 1.5 s budget
    assert result.status == 503


async def test_bad_signature_is_refused_by_simulator() -> None:
    client, _sim = _client()
    client._secret = b"wrong"
    result = await client.deliver(BODY, "m-1", "trace")
    assert result.outcome == "upstream_rejected"
    assert result.status == 400
