"""The operations desk's rules (operations/rules.py), which the HTTP API, the command line and
the ledger's replay statements all use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from operations.rules import needs_approval, replay_id_valid, same_operator
from schemas.states import DeadLetterStatus, status_filter

subjects = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


@given(subjects, subjects)
def test_four_eyes_compare_subjects_case_insensitively_and_symmetrically(a: str, b: str) -> None:
    assert same_operator(a, b) == same_operator(b, a)
    assert same_operator(a, a.upper()) or a.upper().casefold() != a.casefold()
    assert same_operator(f" {a} ", a)


def test_four_eyes_examples() -> None:
    assert same_operator("Op-Alice", "op-alice")
    assert not same_operator("op-alice", "op-bob")
    assert same_operator("db:Op-Alice", "op-alice")  # requested without a token, same person
    assert not same_operator("db:op-alice", "op-bob")


@given(
    count=st.integers(1, 10_000),
    desks=st.lists(st.sampled_from(["power-east", "gas-west", "ercot"]), min_size=1),
    threshold=st.integers(0, 1_000),
)
def test_more_records_or_more_desks_never_need_less_approval(
    count: int, desks: list[str], threshold: int
) -> None:
    needed = needs_approval(count, desks, threshold)
    assert needs_approval(count + 1, desks, threshold) >= needed
    assert needs_approval(count, [*desks, "other-desk"], threshold) >= needed
    assert needed == (count > threshold or len(set(desks)) > 1)


def test_replay_ids() -> None:
    assert replay_id_valid("replay_" + "a" * 32)
    assert not replay_id_valid("replay_é")
    assert not replay_id_valid("job_1")
    assert not replay_id_valid("replay_" + "a" * 64)


@given(st.one_of(st.text(max_size=8), st.integers(-1000, 1000), st.booleans()))
def test_a_dead_letter_status_filter_is_a_status_or_an_http_status_and_nothing_else(
    value: str | int,
) -> None:
    statuses = {s.value for s in DeadLetterStatus}
    try:
        got = status_filter(value)
    except ValueError:
        number = (
            int(value)
            if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 3
            else value
        )
        assert value not in statuses
        assert isinstance(number, bool) or not isinstance(number, int) or not 100 <= number <= 599
        return
    if isinstance(got, DeadLetterStatus):
        assert value == got.value
    else:
        assert 100 <= got <= 599
        assert not isinstance(value, bool)
        assert int(value) == got


def test_dead_letter_status_filter_examples() -> None:
    assert status_filter("open") is DeadLetterStatus.OPEN
    assert status_filter("422") == 422 == status_filter(422)
    for refused in ("opened", "Open", "", "4220", "099", "600", "٤٢٢", True):
        with pytest.raises(ValueError, match="open, replaying"):
            status_filter(refused)
