"""Delivery rules: how every upstream answer of CONTRACT §4 is read (hostile bodies included),
backoff, Retry-After, revisions, drift — and one POST against the simulator in memory."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ops.dev.simulator import SimConfig, SimState, create_simulator
from workers.rules import (
    AnswerKind,
    backoff_delay,
    drift,
    is_superseded,
    parse_position,
    read_answer,
    retry_after_seconds,
)
from workers.upstream import TokenProvider, UpstreamClient

TXN = b'{"transaction_id": "TX-1"}'


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (201, TXN, AnswerKind.TAKEN),
        (200, TXN, AnswerKind.TAKEN),
        (409, TXN, AnswerKind.TAKEN),
        (409, b'{"error": "conflict"}', AnswerKind.REJECTED),
        # Any 2xx: the upstream has it, whatever the body says or fails to say.
        (201, b"", AnswerKind.TAKEN),
        (201, b"\x00\xff not json", AnswerKind.TAKEN),
        (202, b"{}", AnswerKind.TAKEN),
        (400, b"{}", AnswerKind.REJECTED),
        (404, b"{}", AnswerKind.REJECTED),
        (422, b"{}", AnswerKind.REJECTED),
        (301, b"{}", AnswerKind.REJECTED),
        (302, b"{}", AnswerKind.REJECTED),
        (307, b"{}", AnswerKind.REJECTED),
        (401, b"{}", AnswerKind.UNAUTHORIZED),
        (408, b"{}", AnswerKind.TRANSIENT),
        (425, b"{}", AnswerKind.TRANSIENT),
        (429, b"{}", AnswerKind.TRANSIENT),
        (500, b"{}", AnswerKind.TRANSIENT),
        (502, b"{}", AnswerKind.TRANSIENT),
        (503, b"{}", AnswerKind.TRANSIENT),
        (504, b"{}", AnswerKind.TRANSIENT),
        (403, b"{}", AnswerKind.REJECTED),
        (501, b"{}", AnswerKind.REJECTED),
    ],
)
def test_classification(status: int, body: bytes, kind: AnswerKind) -> None:
    assert read_answer(status, body, None, 0.0).kind is kind


@pytest.mark.parametrize(
    ("position", "expected", "known"),
    [
        ('"153.000"', Decimal("153.000"), "given"),
        ("153.5", Decimal("153.500"), "given"),
        ("-12", Decimal("-12.000"), "given"),
        ('"1e13"', None, "unreadable"),
        ("10000000000000", None, "unreadable"),
        ('"NaN"', None, "unreadable"),
        ("NaN", None, "unreadable"),
        ('"twelve"', None, "unreadable"),
        ("true", None, "unreadable"),
        ("[1]", None, "unreadable"),
        ("null", None, "absent"),
    ],
)
def test_reconciled_position_is_read_or_declared_unreadable(
    position: str, expected: Decimal | None, known: str
) -> None:
    body = b'{"transaction_id": "TX-1", "reconciled_position_mwh": ' + position.encode() + b"}"
    answer = read_answer(201, body, None, 0.0)
    assert answer.kind is AnswerKind.TAKEN
    assert answer.position == expected
    assert answer.position_known == known


def test_hostile_error_texts_are_capped_and_escaped() -> None:
    huge = b'{"error": "' + b"x" * 100_000 + b'"}'
    assert len(read_answer(422, huge, None, 0.0).error.encode()) <= 2048
    nul = read_answer(422, b'{"error": "bad\\u0000thing\\ud800"}', None, 0.0).error
    assert "\x00" not in nul
    nul.encode("utf-8")  # no lone surrogate survives
    binary = read_answer(500, bytes(range(256)) * 10, None, 0.0).error
    assert "\x00" not in binary
    assert len(binary.encode()) <= 2048


@given(st.integers(100, 599), st.binary(max_size=300), st.none() | st.text(max_size=40))
# "\u00b2" (superscript two) passed str.isdigit() and broke float(): a ValueError, on 96a19db
@example(503, b"", "\u00b2")
def test_any_answer_is_read_without_error(
    status: int, body: bytes, retry_after: str | None
) -> None:
    answer = read_answer(status, body, retry_after, 0.0)
    assert answer.kind in AnswerKind
    answer.error.encode("utf-8")
    assert "\x00" not in answer.error
    if answer.retry_after_s is not None:
        assert answer.retry_after_s >= 0


def test_backoff_is_full_jitter_capped_and_honours_retry_after_as_given() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
        delays = [
            backoff_delay(attempt, base=0.5, cap=60, retry_after=None, rng=rng) for _ in range(200)
        ]
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling * 0.2  # full jitter reaches near zero
    assert backoff_delay(1, base=0.5, cap=60, retry_after=7, rng=rng) >= 7
    # Retry-After past the cap is honoured (the record's budget bounds it, not the cap).
    assert backoff_delay(1, base=0.5, cap=1, retry_after=2, rng=rng) >= 2


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


def test_parse_position_types() -> None:
    assert parse_position("12.345") == (Decimal("12.345"), "given")
    assert parse_position(Decimal("12.5")) == (Decimal("12.500"), "given")
    assert parse_position(12) == (Decimal("12.000"), "given")
    assert parse_position(None) == (None, "absent")


def _client(**sim: Any) -> tuple[UpstreamClient, SimState]:
    app = create_simulator(SimConfig(client_id="c", client_secret="s", signing_secret="sig", **sim))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")
    tokens = TokenProvider(http, "http://sim/oauth/token", "c", "s")
    return UpstreamClient(http, tokens, base_url="http://sim", signing_secret="sig"), (
        app.state.sim
    )


BODY = b'{"contract_id":"OTC-1","position_mwh":"10.000","revision":1}'


async def test_one_post_per_call_with_the_contracts_headers() -> None:
    client, sim = _client(fail_first_attempts=1)
    token = await client.token()
    first = await client.post(BODY, "m-1", "trace", token)
    assert first.kind is AnswerKind.TRANSIENT
    assert first.status == 503
    second = await client.post(BODY, "m-1", "trace", token)
    assert second.kind is AnswerKind.TAKEN
    assert second.created
    again = await client.post(BODY, "m-1", "trace", token)
    assert again.kind is AnswerKind.TAKEN
    assert not again.created
    assert again.transaction_id == second.transaction_id
    assert sim.posts_by_key["m-1"] == 3
    assert len(sim.effects) == 1
    assert sim.tokens_issued == 1


async def test_expired_token_is_unauthorized_then_renewed() -> None:
    client, sim = _client()
    token = await client.token()
    sim.tokens.clear()
    answer = await client.post(BODY, "m-1", "trace", token)
    assert answer.kind is AnswerKind.UNAUTHORIZED
    await client.renew(token)
    fresh = await client.token()
    assert fresh != token
    assert (await client.post(BODY, "m-1", "trace", fresh)).kind is AnswerKind.TAKEN
    assert sim.tokens_issued == 2


async def test_bad_signature_is_refused_by_simulator() -> None:
    client, _sim = _client()
    client._secret = b"wrong"
    answer = await client.post(BODY, "m-1", "trace", await client.token())
    assert answer.kind is AnswerKind.REJECTED
    assert answer.status == 400
