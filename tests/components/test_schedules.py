"""Tests for epoch ramps (C10)."""

import pytest

from anomalib_recon.components.schedules import EpochSchedule, cosine_ramp, linear_ramp


def test_linear_ramp_first_middle_last_epoch():
    assert linear_ramp(0.0, 1.0, 0, 11) == 0.0
    assert linear_ramp(0.0, 1.0, 5, 11) == 0.5
    assert linear_ramp(0.0, 1.0, 10, 11) == 1.0
    assert linear_ramp(0.6, 1.0, 99, 100) == 1.0  # exact at the last epoch, no rounding error
    assert linear_ramp(0.0, 1.0, 50, 11) == 1.0  # clamped past the end
    assert linear_ramp(2.0, 0.0, 1, 5) == pytest.approx(1.5)  # decreasing ramps work too


def test_linear_ramp_window_like_agpnet_mask_ratio():
    # 0.6 -> 1.0 between epochs 100 and 400 of 500
    assert linear_ramp(0.6, 1.0, 0, 500, begin_epoch=100, end_epoch=400) == 0.6
    assert linear_ramp(0.6, 1.0, 100, 500, begin_epoch=100, end_epoch=400) == 0.6
    assert linear_ramp(0.6, 1.0, 250, 500, begin_epoch=100, end_epoch=400) == pytest.approx(0.8)
    assert linear_ramp(0.6, 1.0, 450, 500, begin_epoch=100, end_epoch=400) == 1.0
    assert linear_ramp(0.0, 1.0, 3, None, end_epoch=4) == 0.75  # max_epochs not needed with end_epoch


def test_single_epoch_and_errors():
    assert linear_ramp(0.0, 1.0, 0, 1) == 1.0
    with pytest.raises(ValueError, match="max_epochs"):
        linear_ramp(0.0, 1.0, 0, None)
    with pytest.raises(ValueError, match="max_epochs"):
        linear_ramp(0.0, 1.0, 0, -1)  # Lightning's value when only max_steps is set
    with pytest.raises(ValueError, match="epoch must be"):
        linear_ramp(0.0, 1.0, -1, 10)


def test_cosine_ramp():
    assert cosine_ramp(0.0, 1.0, 0, 11) == 0.0
    assert cosine_ramp(0.0, 1.0, 5, 11) == pytest.approx(0.5)
    assert cosine_ramp(0.0, 1.0, 10, 11) == 1.0
    assert cosine_ramp(0.0, 1.0, 1, 11) < linear_ramp(0.0, 1.0, 1, 11)  # slow start


def test_epoch_schedule_object():
    sched = EpochSchedule(0.0, 1.0, max_epochs=5)
    assert sched.value == 0.0
    assert [sched(e) for e in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sched.value == 1.0
    assert sched(2, max_epochs=3) == 1.0  # the trainer's max_epochs wins when given
    assert sched(2, max_epochs=-1) == 0.5  # -1 (max_steps training) falls back to the stored max_epochs
    const = EpochSchedule(0.0, 0.1, kind="constant")
    assert const.value == 0.1 and const(7) == 0.1
    assert EpochSchedule(0.0, 1.0, kind="cosine", end_epoch=2)(1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="kind must be"):
        EpochSchedule(0.0, 1.0, kind="step")
