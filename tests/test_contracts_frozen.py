"""What is frozen, what is random: during the optim.freeze_last_layer epochs every tensor of the head's last layer
(each weight-norm part, by name) gets no update, and only those; the teacher never drops paths, in train mode or not."""
import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
LAST_LAYER = ("head.last_layer.weight_g", "head.last_layer.weight_v")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def student_tensors(trainer):
    return {name: value.detach().clone() for name, value in trainer.student.named_parameters()}


def test_only_the_last_layer_is_frozen_and_only_during_its_epochs(images, tmp_path):
    """norm_last_layer=false: both weight-norm parts are trained, so both must be held during the first epoch."""
    trainer = Trainer(tiny_config(images, tmp_path, "model.norm_last_layer=false", "optim.freeze_last_layer=1",
                                  "model.drop_path_rate=0"))
    names = [name.removeprefix("_orig_mod.") for name, _ in trainer.student.named_parameters()]
    assert set(LAST_LAYER) <= set(names)
    start = student_tensors(trainer)
    trainer.train(stop_after_steps=4)  # epoch 0: 4 steps of 4 images
    after_freeze = student_tensors(trainer)
    unchanged = sorted(name for name in start if torch.equal(start[name], after_freeze[name]))
    assert unchanged == sorted(name for name in start if name.endswith(LAST_LAYER)), unchanged
    trainer.train(stop_after_steps=6)  # epoch 1: the last layer learns
    after = student_tensors(trainer)
    assert all(not torch.equal(after_freeze[name], after[name]) for name in after if name.endswith(LAST_LAYER))


def test_the_teacher_never_drops_paths(images, tmp_path):
    trainer = Trainer(tiny_config(images, tmp_path, "model.drop_path_rate=0.5", "model.depth=2"))
    crops = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        trainer.student.train()
        student = [trainer.student.backbone(crops) for _ in range(2)]
        assert not torch.equal(*student)  # the student does drop paths at this rate: the check below can fail
        for mode in (True, False):
            trainer.teacher.train(mode)
            first, second = trainer.teacher.backbone(crops), trainer.teacher.backbone(crops)
            trainer.teacher.eval()
            assert torch.equal(first, second) and torch.equal(first, trainer.teacher.backbone(crops)), mode
