"""The circuit breaker's rules (operations/circuit.py) as a state machine checked with
Hypothesis, and the maintenance-window arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ledger.rows import Circuit, MaintenanceWindow
from operations.circuit import (
    BreakerConfig,
    Failed,
    Go,
    Hold,
    ProbeDue,
    Succeeded,
    TakeProbe,
    maintenance_until,
    probe_due,
    step,
    verdict,
)
from schemas.states import CircuitState, Waiting

C = CircuitState
T0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
CONFIG = BreakerConfig(failures=5, window_s=30.0, probe_interval_s=5.0)


def closed() -> Circuit:
    return Circuit(C.CLOSED, T0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_it_opens_after_failures_in_a_row_within_the_window() -> None:
    c = closed()
    for i in range(4):
        c = step(c, Failed(), at(i), CONFIG)
        assert c.state is C.CLOSED
    c = step(c, Failed(), at(4), CONFIG)
    assert (c.state, c.reason, c.next_probe_at) == (C.OPEN, "failures", at(9))
    assert verdict(c, [], at(5)) == Hold(Waiting.CIRCUIT_OPEN, at(9))
    assert verdict(c, [], at(9)) == ProbeDue()


def test_a_success_or_a_stale_window_starts_the_count_again() -> None:
    c = closed()
    for i in range(4):
        c = step(c, Failed(), at(i), CONFIG)
    c = step(c, Succeeded(), at(4), CONFIG)
    c = step(c, Failed(), at(5), CONFIG)
    assert (c.state, c.failures) == (C.CLOSED, 1)
    for i in range(3):
        c = step(c, Failed(), at(6 + i), CONFIG)
    c = step(c, Failed(), at(60), CONFIG)  # the window started at 5 s is over
    assert (c.state, c.failures) == (C.CLOSED, 1)


def test_one_probe_at_a_time_and_its_answer_decides() -> None:
    c = Circuit(C.OPEN, T0, "failures", next_probe_at=at(5))
    assert step(c, TakeProbe("w1", 15), at(4), CONFIG) == c  # not due yet
    c = step(c, TakeProbe("w1", 15), at(5), CONFIG)
    assert (c.state, c.probe_owner) == (C.HALF_OPEN, "w1")
    assert step(c, TakeProbe("w2", 15), at(6), CONFIG).probe_owner == "w1"
    failed = step(c, Failed(probe=True), at(7), CONFIG)
    assert (failed.state, failed.next_probe_at) == (C.OPEN, at(12))
    assert step(c, Succeeded(probe=True), at(7), CONFIG).state is C.CLOSED
    # the prober died: once its lease is over another worker probes
    assert step(c, TakeProbe("w2", 15), at(21), CONFIG).probe_owner == "w2"


def test_an_announced_maintenance_opens_until_then_and_reads_as_maintenance() -> None:
    c = step(closed(), Failed(announced_s=600), at(0), CONFIG)
    assert (c.state, c.reason, c.next_probe_at) == (C.OPEN, "announced", at(600))
    assert verdict(c, [], at(10)) == Hold(Waiting.MAINTENANCE, at(600))
    # a shorter announcement later does not cut it short
    assert step(c, Failed(announced_s=60), at(10), CONFIG).next_probe_at == at(600)


def test_windows_hold_from_just_before_they_start_and_run_on_when_they_touch() -> None:
    def window(start: float, end: float, cancelled: bool = False) -> MaintenanceWindow:
        return MaintenanceWindow(
            f"w{start}", at(start), at(end), "r", "op", T0, at(0) if cancelled else None
        )

    windows = [window(100, 200), window(200, 300), window(250, 400), window(500, 600, True)]
    assert maintenance_until(windows, at(99.6), margin_s=0.5) == at(400)
    assert maintenance_until(windows, at(99.4), margin_s=0.5) is None
    assert maintenance_until(windows, at(550)) is None  # cancelled
    assert verdict(closed(), windows, at(150)) == Hold(Waiting.MAINTENANCE, at(400))
    assert verdict(closed(), windows, at(400)) == Go()


events = st.one_of(
    st.builds(Failed, probe=st.booleans(), announced_s=st.none() | st.floats(1, 3600)),
    st.builds(Succeeded, probe=st.booleans()),
    st.builds(TakeProbe, owner=st.sampled_from(["w1", "w2", "w3"]), lease_s=st.floats(1, 30)),
)


class BreakerMachine(RuleBasedStateMachine):
    """Any sequence of events at increasing times keeps the row consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.c = closed()
        self.now = T0

    @rule(event=events, later=st.floats(0, 20))
    def happens(self, event: Failed | Succeeded | TakeProbe, later: float) -> None:
        self.now += timedelta(seconds=later)
        before = self.c
        self.c = step(self.c, event, self.now, CONFIG)
        if isinstance(event, Succeeded):
            assert self.c.state is C.CLOSED
        if isinstance(event, TakeProbe) and self.c.probe_owner != before.probe_owner:
            assert probe_due(before, self.now)
        if before.state is C.CLOSED and self.c.state is C.OPEN:
            assert isinstance(event, Failed)

    @invariant()
    def consistent(self) -> None:
        c = self.c
        assert (c.state is C.HALF_OPEN) == (c.probe_owner is not None)
        assert (c.state is C.OPEN) <= (c.next_probe_at is not None)
        assert c.failures < CONFIG.failures
        assert c.since <= self.now
        if c.state is C.CLOSED:
            assert isinstance(verdict(c, [], self.now), Go)
        else:
            assert not isinstance(verdict(c, [], self.now), Go)


TestBreakerMachine = BreakerMachine.TestCase


@given(st.lists(st.sampled_from(["fail", "ok"]), max_size=60))
def test_it_is_open_exactly_when_a_run_of_failures_reached_the_threshold(
    answers: list[str],
) -> None:
    c, run = closed(), 0
    for i, answer in enumerate(answers):
        c = step(c, Failed() if answer == "fail" else Succeeded(), at(i * 0.1), CONFIG)
        run = run + 1 if answer == "fail" else 0
        if run >= CONFIG.failures:
            assert c.state is C.OPEN
            break
        assert c.state is C.CLOSED
