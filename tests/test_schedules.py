"""Per-iteration schedules at their start, warm-up and end points."""
import math

import numpy as np
import pytest

from common.scaling import scaled_lr
from pretrain.schedules import cosine_schedule


def test_lr_schedule_warmup_then_cosine():
    ipe, epochs, warmup = 10, 20, 2
    base = scaled_lr(5e-4, 1024)
    assert base == pytest.approx(2e-3)  # the paper's ViT-S/16 peak at batch 1024
    schedule = cosine_schedule(base, 1e-6, epochs, ipe, warmup)
    assert len(schedule) == epochs * ipe
    assert schedule[0] == 0.0  # warm-up starts at exactly 0
    assert schedule[warmup * ipe - 1] == pytest.approx(base)  # linspace includes its end
    assert schedule[warmup * ipe] == pytest.approx(base)  # cosine starts at the peak
    n = (epochs - warmup) * ipe
    assert schedule[-1] == pytest.approx(1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * (n - 1) / n)))
    assert schedule[warmup * ipe + n // 2] == pytest.approx((base + 1e-6) / 2)
    assert np.all(np.diff(schedule[warmup * ipe:]) <= 0)


def test_weight_decay_rises_and_momentum_goes_to_one():
    wd = cosine_schedule(0.04, 0.4, 100, 5)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-4)
    assert np.all(np.diff(wd) >= 0)
    momentum = cosine_schedule(0.996, 1.0, 100, 5)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-7)


def test_warmup_longer_than_run_is_an_error():
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 2, 10, warmup_epochs=3)
