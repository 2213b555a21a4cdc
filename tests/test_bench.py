import pytest

from helpers.bench import Timing, measure


def fake_clock(durations):
    """A clock whose consecutive start/stop readings are `durations` apart."""
    readings, now = [], 0.0
    for d in durations:
        readings += [now, now + d]
        now += d + 100.0
    return iter(readings).__next__


def test_median_and_iqr_on_a_fake_clock():
    calls = []
    timing = measure(
        lambda: calls.append(1), warmup=3, repeats=5, clock=fake_clock([5, 1, 4, 2, 3])
    )
    assert len(calls) == 3 + 5  # warm-up runs are executed but not timed
    assert timing.samples == [5, 1, 4, 2, 3]
    assert timing.median == 3
    assert (timing.q1, timing.q3, timing.iqr) == (2, 4, 2)


def test_single_sample_has_zero_spread():
    timing = Timing("one", [0.25])
    assert timing.median == timing.q1 == timing.q3 == 0.25


def test_row_and_str():
    timing = Timing("matmul", [0.001, 0.002, 0.003], meta={"dtype": "fp32"})
    row = timing.row(size=64)
    assert row == {
        "name": "matmul", "median_s": 0.002, "q1_s": 0.0015, "q3_s": 0.0025,
        "repeats": 3, "dtype": "fp32", "size": 64,
    }  # fmt: skip
    assert str(timing) == "matmul: 2 ms median (IQR 1.5 ms–2.5 ms, n=3)"


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)


def test_before_each_runs_untimed_before_every_timed_run():
    calls = []
    ticks = iter(range(100))
    timing = measure(
        lambda: calls.append("fn"), warmup=1, repeats=3,
        before_each=lambda: calls.append("before"), clock=lambda: next(ticks),
    )  # fmt: skip
    assert calls == ["fn"] + ["before", "fn"] * 3
    assert timing.samples == [1, 1, 1]  # the clock ticks once per read: before_each is outside
