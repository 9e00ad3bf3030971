"""Timings reduced over rounds: a speed-up pairs the timings of one round, never of two."""
import pytest

from canao.qa.bench import in_frame_of, median_ms, speedup


def test_median_ms_is_each_backends_median_over_rounds():
    rounds = [{"litert": 10.0, "litert-int8": 4.0}, {"litert": 30.0, "litert-int8": 2.0},
              {"litert": 20.0, "litert-int8": 3.0}]
    assert median_ms(rounds) == {"litert": 20.0, "litert-int8": 3.0}


def test_speedup_is_the_median_of_each_rounds_ratio():
    # a slow second round slows both models: its ratio stays 8; the ratio of medians would be 75/9.
    teacher = [{"litert": 72.0}, {"litert": 90.0}, {"litert": 75.0}]
    model = [{"litert-int8": 9.0}, {"litert-int8": 11.25}, {"litert-int8": 8.0}]
    assert speedup(teacher, "litert", model, "litert-int8") == pytest.approx(8.0)
    with pytest.raises(ValueError):  # rounds must pair up
        speedup(teacher, "litert", model[:2], "litert-int8")


def test_timings_in_the_teachers_frame_scale_by_the_paired_ratio():
    # the machine runs at 80 ms per teacher pass where the budget was made at 64: the student's 10 ms
    # (an 8x ratio) reads 8 ms in the budget's frame, whatever the hour's speed
    teacher = [{"litert": 80.0}, {"litert": 96.0}, {"litert": 72.0}]
    student = [{"litert-int8": 10.0, "litert": 40.0}, {"litert-int8": 12.0, "litert": 48.0},
               {"litert-int8": 9.0, "litert": 36.0}]
    assert in_frame_of(teacher, "litert", 64.0, student) == pytest.approx({"litert-int8": 8.0, "litert": 32.0})
