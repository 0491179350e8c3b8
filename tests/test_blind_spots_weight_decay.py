"""Weight decay through the real training step: only weight matrices are decayed, with the value the schedule gives
at that very step; biases and norm weights move exactly as AdamW without decay.

Reference: torch.optim.AdamW on detached copies, fed the gradients the trainer's optimizer used (the student's
.grad after `train_step`, i.e. after clipping), with the two groups split by name here and the weight decay computed
here from the cosine formula. The schedule is steep (0.2 -> 4.0 over 4 steps) and the lr large, so decaying a bias
or using a stale or wrong decay moves a weight by far more than the tolerance.
"""
import math

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino.trainer import Trainer

WD_START, WD_END, STEPS = 0.2, 4.0, 4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), count=16)


def scheduled_weight_decay(step, total):
    """The reference's cosine from weight_decay to weight_decay_end, no warmup."""
    return WD_END + 0.5 * (WD_START - WD_END) * (1 + math.cos(math.pi * step / total))


def test_only_weight_matrices_are_decayed_with_the_scheduled_value_at_each_step(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path, "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=2.0",
                         "optim.min_lr=1.0", f"optim.weight_decay={WD_START}", f"optim.weight_decay_end={WD_END}",
                         "optim.freeze_last_layer=0", "model.drop_path_rate=0.0", "monitor_every=0")
    trainer = Trainer(config)
    assert trainer.schedules.total_steps == STEPS
    named = [(name, p) for name, p in trainer.student.named_parameters() if p.requires_grad]
    no_decay = {name for name, p in named if name.endswith(".bias") or p.ndim == 1}
    assert any("norm" in name for name in no_decay) and any(name.endswith(".bias") for name in no_decay)
    assert "backbone.cls_token" not in no_decay and len(no_decay) < len(named)

    copies = {name: p.detach().clone().requires_grad_(True) for name, p in named}
    reference = torch.optim.AdamW(
        [{"params": [copies[n] for n, _ in named if n not in no_decay]},
         {"params": [copies[n] for n, _ in named if n in no_decay], "weight_decay": 0.0}], lr=0.0)

    batches = iter(trainer.loader.epoch_iter(0))
    decays = []
    for step in range(STEPS):
        crops, _ = next(batches)
        before = {name: p.detach().clone() for name, p in named}
        trainer.train_step(crops)
        wd = scheduled_weight_decay(step, STEPS)
        decays.append(wd)
        decayed_group, plain_group = trainer.optimizer.param_groups
        assert decayed_group["weight_decay"] == pytest.approx(wd, rel=1e-9), f"step {step}"
        assert plain_group["weight_decay"] == 0.0, f"step {step}: biases and norms must never be decayed"
        lr = decayed_group["lr"]
        assert lr > 0.01
        for group in reference.param_groups:
            group["lr"] = lr
        reference.param_groups[0]["weight_decay"] = wd
        for name, p in named:
            copies[name].grad = None if p.grad is None else p.grad.detach().clone()
        reference.step()
        for name, p in named:
            expected = copies[name].detach()
            # decay would shift this parameter by lr * wd * |p|: far above the tolerance wherever p is not ~0
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name: f"step {step}, {name}: {m}")
        # meaningful: the no-decay group holds weights that decay would have moved by much more than the tolerance
        shift = max((lr * wd * before[n].abs().max()).item() for n in no_decay)
        assert shift > 1e-3, shift
    assert len(set(round(d, 6) for d in decays)) == STEPS  # a decay frozen at its first value would show
