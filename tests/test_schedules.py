"""Schedules and lr scaling against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dino.errors import UserError
from dino.train.schedules import (
    Schedule,
    cosine_schedule,
    last_layer_lr_schedule,
    momentum_schedule,
    scale_lr,
    teacher_temp_schedule,
)


def test_cosine_schedule_warmup_includes_endpoint_and_cosine_formula():
    values = cosine_schedule(1.0, 0.1, total_iters=10, warmup_iters=3, start_warmup_value=0.5)
    assert len(values) == 10
    np.testing.assert_allclose(values[:3], [0.5, 0.75, 1.0])  # linspace with the endpoint
    expected_cosine = [0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * i / 7)) for i in range(7)]
    np.testing.assert_allclose(values[3:], expected_cosine, rtol=1e-12)
    assert values[3] == 1.0 and values[-1] > 0.1  # starts at base, never reaches final


def test_start_warmup_value_ignored_without_warmup():
    values = cosine_schedule(2.0, 0.0, total_iters=4, start_warmup_value=123.0)
    np.testing.assert_allclose(values, [1.0 + math.cos(math.pi * i / 4) for i in range(4)], atol=1e-12)


def test_freeze_iters_are_leading_zeros():
    values = cosine_schedule(1.0, 0.0, total_iters=8, warmup_iters=2, freeze_iters=3)
    np.testing.assert_array_equal(values[:3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(values[3:5], [0.0, 1.0])
    assert len(values) == 8


def test_cosine_schedule_rejects_too_long_warmup():
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_iters=3, warmup_iters=2, freeze_iters=2)


def test_schedule_past_end_returns_final_value():
    schedule = Schedule.cosine(1.0, 0.25, total_iters=5)
    assert len(schedule) == 5
    assert schedule[0] == 1.0
    assert schedule[4] != 0.25
    assert schedule[5] == 0.25 and schedule[10_000] == 0.25
    with pytest.raises(IndexError):
        schedule[-1]


def test_teacher_temp_v1_is_per_epoch():
    schedule = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, total_epochs=100, iters_per_epoch=7)
    assert len(schedule) == 100
    assert schedule[0] == 0.04
    assert schedule[29] == pytest.approx(0.07)
    assert schedule[1] == pytest.approx(0.04 + 0.03 / 29)
    assert schedule[30] == 0.07 and schedule[99] == 0.07 and schedule[500] == 0.07


def test_teacher_temp_dinov2_is_per_iteration():
    schedule = teacher_temp_schedule(
        0.04, 0.07, warmup_epochs=3, total_epochs=10, iters_per_epoch=5, per_iteration=True
    )
    assert len(schedule) == 50
    assert schedule[0] == 0.04
    assert schedule[1] == pytest.approx(0.04 + 0.03 / 14)
    assert schedule[14] == pytest.approx(0.07)
    assert schedule[15] == 0.07 and schedule[10_000] == 0.07


def test_teacher_temp_without_warmup_is_constant():
    schedule = teacher_temp_schedule(0.04, 0.07, warmup_epochs=0, total_epochs=4)
    np.testing.assert_array_equal(schedule.values, [0.07] * 4)


def test_momentum_schedule_goes_from_base_to_one():
    schedule = momentum_schedule(0.996, total_iters=6)
    assert schedule[0] == 0.996
    expected = [1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    np.testing.assert_allclose(schedule.values, expected, rtol=1e-12)
    assert np.all(np.diff(schedule.values) > 0)
    assert schedule[6] == 1.0


def test_last_layer_lr_schedule_zeroes_the_start_only():
    lr = Schedule.cosine(1.0, 0.0, total_iters=6, warmup_iters=2)
    frozen = last_layer_lr_schedule(lr, freeze_iters=3)
    np.testing.assert_array_equal(frozen.values[:3], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(frozen.values[3:], lr.values[3:])
    assert lr.values[2] == 1.0  # the original is not modified


def test_scale_lr_rules():
    assert scale_lr(0.0005, 1024, "linear") == pytest.approx(0.002)  # DINO v1: per 256 images
    assert scale_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)  # DINOv2: sqrt(256/1024) = 1/2
    assert scale_lr(0.004, 4096, "sqrt_wrt_1024") == pytest.approx(0.008)
    assert scale_lr(0.004, 4096, "none") == 0.004
    with pytest.raises(UserError, match="sqrt_wrt_1024"):
        scale_lr(0.004, 256, "sqrt")


def test_schedules_v2_warmup_cosine_hold_against_the_formula_step_by_step():
    from dino.train.schedules import Schedule, warmup_cosine_hold

    start, peak, end, warmup, cosine, total = 0.0, 1.0e-3, 1.0e-5, 4, 6, 13
    values = warmup_cosine_hold(start, peak, end, warmup, cosine, total)
    expected = []
    for i in range(total):
        if i < warmup:  # linear, the peak itself not reached (endpoint excluded)
            expected.append(start + (peak - start) * i / warmup)
        elif i < warmup + cosine:  # both ends included: first = peak, last = end
            j = i - warmup
            expected.append(end + 0.5 * (peak - end) * (1 + math.cos(math.pi * j / (cosine - 1))))
        else:
            expected.append(end)
    assert values.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert values[warmup] == pytest.approx(peak) and values[warmup + cosine - 1] == pytest.approx(end)
    assert len(warmup_cosine_hold(start, peak, end, warmup, cosine, 7)) == 7  # a shorter run cuts it
    schedule = Schedule.warmup_cosine_hold(start, peak, end, warmup, cosine, total)
    assert schedule[100] == end


def test_dinov3_batch_scaling_rules():
    from dino.errors import UserError
    from dino.train.schedules import scale_for_batch_v3

    assert scale_for_batch_v3(1e-3, 512, "linear_wrt_256") == pytest.approx(2e-3)
    assert scale_for_batch_v3(1e-3, 4096, "sqrt_wrt_1024") == pytest.approx(1e-3 * 4 * 2)
    assert scale_for_batch_v3(1e-3, 4096, "none") == 1e-3
    with pytest.raises(UserError, match="sqrt_wrt_1024"):
        scale_for_batch_v3(1e-3, 64, "sqrt")
