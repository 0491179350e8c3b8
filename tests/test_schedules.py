"""Schedules against their closed forms (the reference's cosine with linear warmup)."""
import math

import numpy as np
import pytest

from fastdino.config import load_config
from fastdino.schedules import Schedules, cosine_schedule, teacher_temperature_schedule


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_cosine_schedule_closed_form(warmup_epochs):
    base, final, epochs, per_epoch = 0.5, 0.01, 6, 7
    schedule = cosine_schedule(base, final, epochs, per_epoch, warmup_epochs, start_warmup_value=0.1)
    assert len(schedule) == epochs * per_epoch
    warmup = warmup_epochs * per_epoch
    for step in range(len(schedule)):
        if step < warmup:
            expected = 0.1 + (base - 0.1) * step / (warmup - 1)
        else:
            t = (step - warmup) / (epochs * per_epoch - warmup)
            expected = final + (base - final) * (1 + math.cos(math.pi * t)) / 2
        assert schedule[step] == pytest.approx(expected, rel=1e-12)


def test_teacher_temperature_warmup_then_constant():
    temps = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(temps) == 100 and temps[0] == 0.04 and temps[29] == pytest.approx(0.07)
    assert np.all(temps[30:] == 0.07) and np.all(np.diff(temps[:30]) > 0)


def test_run_schedules_scale_lr_with_total_batch():
    config = load_config(None, ["optim.epochs=4", "optim.warmup_epochs=1", "data.batch_size_per_gpu=32"])
    schedules = Schedules(config, steps_per_epoch=5, world_size=4)
    assert schedules.lr.max() == pytest.approx(config.optim.lr * 128 / 256)
    assert schedules.momentum[0] == pytest.approx(0.996) and schedules.momentum[-1] < 1.0
    assert schedules.momentum[-1] > schedules.momentum[-2] > schedules.momentum[0]
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] == pytest.approx(0.4, rel=1e-2)
    assert schedules.total_steps == 20 == len(schedules.weight_decay)


def test_one_record_per_step_holds_every_scheduled_value():
    """`at(step)` against the closed forms: the lr warmup and cosine, the weight decay and momentum cosines, the
    teacher temperature of the step's epoch, and the last layer frozen during the first epochs only."""
    config = load_config(None, ["optim.epochs=5", "optim.warmup_epochs=2", "optim.freeze_last_layer=3",
                                "dino.warmup_teacher_temp_epochs=2", "dino.teacher_temp=0.07",
                                "data.batch_size_per_gpu=64"])
    per_epoch, total = 4, 20
    schedules = Schedules(config, steps_per_epoch=per_epoch, world_size=2)
    peak = config.optim.lr * 128 / 256
    for step in range(total):
        values = schedules.at(step)
        epoch = step // per_epoch
        lr = peak * step / 7 if step < 8 else \
            1e-6 + (peak - 1e-6) * (1 + math.cos(math.pi * (step - 8) / 12)) / 2
        cosine = (1 + math.cos(math.pi * step / total)) / 2
        assert values.epoch == epoch and values.lr == pytest.approx(lr, rel=1e-12)
        assert values.weight_decay == pytest.approx(0.4 + (0.04 - 0.4) * cosine, rel=1e-12)
        assert values.teacher_momentum == pytest.approx(1.0 + (0.996 - 1.0) * cosine, rel=1e-12)
        assert values.teacher_temp == pytest.approx([0.04, 0.07, 0.07, 0.07, 0.07][epoch], rel=1e-12)
        assert values.last_layer_frozen == (epoch < 3)
