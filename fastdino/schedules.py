"""Per-iteration schedules of the reference: lr (linear warmup then cosine), weight decay, teacher momentum,
and the per-epoch teacher temperature."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per training step: a linear warmup over `warmup_epochs`, then a half cosine from
    `base_value` to `final_value` over the remaining steps (the last value stays just above `final_value`)."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


def teacher_temperature_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """One teacher temperature per epoch: linear from `warmup_temp` to `final_temp`, then constant."""
    return np.concatenate(
        (np.linspace(warmup_temp, final_temp, warmup_epochs), np.full(epochs - warmup_epochs, final_temp))
    )


@dataclass(frozen=True)
class StepSchedule:
    """Every scheduled value of one training step, looked up once: the step, the loss and the log row read it."""

    epoch: int
    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    last_layer_frozen: bool  # the head's last layer gets no update (the first optim.freeze_last_layer epochs)


class Schedules:
    """The schedules of a run, indexed by global step (the teacher temperature and the last layer's freeze by
    epoch); `at(step)` reads them all for one step."""

    def __init__(self, config, steps_per_epoch: int, world_size: int = 1) -> None:
        optim, dino = config.optim, config.dino
        self.steps_per_epoch = steps_per_epoch
        self.freeze_last_layer = optim.freeze_last_layer
        total_batch = config.data.batch_size_per_gpu * world_size
        self.lr = cosine_schedule(
            optim.lr * total_batch / 256.0, optim.min_lr, optim.epochs, steps_per_epoch, optim.warmup_epochs
        )
        self.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, optim.epochs, steps_per_epoch)
        self.momentum = cosine_schedule(dino.momentum_teacher, 1.0, optim.epochs, steps_per_epoch)
        self.teacher_temp = teacher_temperature_schedule(
            dino.warmup_teacher_temp, dino.teacher_temp, dino.warmup_teacher_temp_epochs, optim.epochs
        )
        self.total_steps = optim.epochs * steps_per_epoch
        assert len(self.lr) == self.total_steps and math.isfinite(float(self.lr.sum()))

    def at(self, step: int) -> StepSchedule:
        """The values of global step `step` (0-based: the step about to run)."""
        epoch = step // self.steps_per_epoch
        return StepSchedule(epoch=epoch, lr=float(self.lr[step]), weight_decay=float(self.weight_decay[step]),
                            teacher_momentum=float(self.momentum[step]), teacher_temp=float(self.teacher_temp[epoch]),
                            last_layer_frozen=epoch < self.freeze_last_layer)
