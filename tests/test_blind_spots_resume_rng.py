"""Stop/resume is bit-identical *because* the random generators are restored, not because nothing draws.

tests/test_trainer.py's resume test uses a one-block ViT, whose stochastic-depth rate is linspace(0, rate, 1) = [0]:
no training step draws from the global generator there (augmentations have their own per-sample generators), so a
resume that forgot the RNG state would still pass it. Here the student has two blocks with a drop rate of 0.5 on the
second, so every step draws its drop masks from torch's CPU generator; the test checks that it does, then that
3 steps + stop + resume + 1 step equal 4 steps straight through, bit for bit.
"""
import pytest
import torch
from helpers import assert_identical, state_of, tiny_config, write_image_folder

from fastdino.models.vit import Block
from fastdino.trainer import Trainer

SETTINGS = ("model.depth=2", "model.drop_path_rate=0.5", "optim.epochs=1", "optim.warmup_epochs=0",
            "optim.freeze_last_layer=0", "monitor_every=0")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), count=16)


@pytest.mark.parametrize("efficient", [False, True])
def test_residual_drop_draws_from_the_global_generator(efficient):
    """Both stochastic-depth forms take their masks from torch's global CPU generator, which the checkpoint saves."""
    torch.manual_seed(0)
    block = Block(16, 2, 2.0, 0.5, efficient, "math").train()
    x = torch.randn(8, 3, 16)
    state = torch.get_rng_state()
    first = block(x)
    assert not torch.equal(torch.get_rng_state(), state), "a training forward with drop rate 0.5 must draw"
    torch.set_rng_state(state)
    assert torch.equal(block(x), first), "same generator state, same masks"
    second = block(x)
    assert not torch.equal(second, first), "another generator state gives other masks (8 rows at rate 0.5)"


def test_stop_and_resume_with_stochastic_depth_is_bit_identical(image_folder, tmp_path):
    straight = Trainer(tiny_config(image_folder, tmp_path / "straight", *SETTINGS))
    assert straight.student.backbone.blocks[1].drop_prob == pytest.approx(0.5)
    assert straight.schedules.total_steps == 4
    # the training step draws from the global generator (the student's drop masks): the state must matter
    # (the loader's augmentations fork the generator and restore it: the drop masks are what moves it)
    rng_before = torch.get_rng_state()
    straight.train()
    assert not torch.equal(torch.get_rng_state(), rng_before), "training steps with stochastic depth must draw"
    assert straight.step == 4

    first = Trainer(tiny_config(image_folder, tmp_path / "resumed", *SETTINGS, "checkpoint_every=1"))
    first.train(stop_after_steps=3)
    torch.manual_seed(12345)  # what happens in between (a new process, other work) must not matter
    second = Trainer(tiny_config(image_folder, tmp_path / "resumed", *SETTINGS, "checkpoint_every=1"))
    assert second.step == 3
    second.train()
    assert second.step == 4
    assert_identical(state_of(straight), state_of(second))
