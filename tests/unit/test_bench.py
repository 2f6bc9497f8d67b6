"""The benchmark's arithmetic (ratios and medians over runs) and its own footprint."""

from __future__ import annotations

from ops.dev.bench import Row, median_rows, percentile, poller


def test_median_of_runs_and_ratio() -> None:
    runs = [
        [Row("worker", "rec/s", 100.0, 200.0, "rec/s")],
        [Row("worker", "rec/s", 300.0, 250.0, "rec/s")],
        [Row("worker", "rec/s", 200.0, 400.0, "rec/s")],
    ]
    [row] = median_rows(runs)
    assert row.value == 200.0
    assert row.baseline == 250.0
    assert row.ratio == 0.5  # the median of the runs' own ratios (0.5, 1.2, 0.5)
    assert median_rows(runs[:1]) == runs[0]


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0


async def test_the_simulator_is_polled_with_one_client_per_event_loop() -> None:
    """A client per poll cost ~20 ms of CPU each (an SSL context and the CA bundle), taken from
    the two cores the measured processes share while every drain was timed."""
    first = poller()
    assert poller() is first
    assert not first.is_closed
