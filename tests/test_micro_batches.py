"""Gradient accumulation (data.micro_batches): a step split into 2 or 4 micro-batches is the step of the whole batch
(loss, student, teacher, center, optimizer moments) within float32 rounding, with the plain and the fused loss; the
center moves once per step from the whole batch; the setting's rule is one line. Two-process FSDP and DDP are in
test_distributed.py."""
import json

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino.config import ConfigError, load_config
from fastdino.trainer import Trainer

# SGD with momentum: its update and its moment are proportional to the gradient, so a wrongly weighted micro-batch
# shows (AdamW normalizes the gradient, and turns the rounding noise of gradients that are zero in exact arithmetic,
# such as the attention's key bias, into full-size steps).
SETTINGS = ("model.drop_path_rate=0.0", "data.batch_size_per_gpu=8", "optim.warmup_epochs=0", "optim.lr=1.0",
            "optim.optimizer=sgd", "optim.freeze_last_layer=0", "model.depth=2", "monitor_every=1", "optim.epochs=3")
STEPS = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", count=16)


def batches(count: int):
    generator = torch.Generator().manual_seed(5)
    return [[torch.randn(8, 3, size, size, generator=generator) for size in (16, 16, 8, 8)] for _ in range(count)]


def trained(images, output_dir, micro_batches: int, fused: bool):
    trainer = Trainer(tiny_config(images, output_dir, f"data.micro_batches={micro_batches}",
                                  f"fast.fused_loss={str(fused).lower()}", *SETTINGS))
    outputs = [trainer.train_step(crops, monitors=True) for crops in batches(STEPS)]
    figures = torch.tensor([[output.loss.item(), output.teacher_entropy.item(), output.teacher_student_kl.item()]
                            for output in outputs])
    return trainer, figures


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_give_the_step_of_the_whole_batch(images, tmp_path, micro_batches, fused):
    whole, whole_figures = trained(images, tmp_path / "whole", 1, fused)
    split, split_figures = trained(images, tmp_path / "split", micro_batches, fused)
    torch.testing.assert_close(split_figures, whole_figures, rtol=1e-5, atol=1e-6)
    for network in ("student", "teacher"):
        expected, got = getattr(whole, network).state_dict(), getattr(split, network).state_dict()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{network}.{name}")
    torch.testing.assert_close(split.dino_loss.center, whole.dino_loss.center, rtol=1e-5, atol=1e-7)
    expected, got = whole.optimizer.state_dict()["state"], split.optimizer.state_dict()["state"]
    for index in expected:
        torch.testing.assert_close(got[index]["momentum_buffer"], expected[index]["momentum_buffer"], rtol=1e-4,
                                   atol=1e-5)  # buffers of order 1: float32 rounding of sums in another order
    # meaningful only if training moved things: the center left zero, the student its start
    assert whole.dino_loss.center.abs().sum() > 0
    assert (whole.student.state_dict()["backbone.cls_token"] != whole.teacher.state_dict()["backbone.cls_token"]).any()


def test_the_step_counter_schedules_and_log_count_optimizer_steps(images, tmp_path):
    trainer = Trainer(tiny_config(images, tmp_path / "run", "data.micro_batches=4", *SETTINGS))
    trainer.train(stop_after_steps=3)
    assert trainer.step == 3
    assert trainer.schedules.at(trainer.step).epoch == 1  # 2 steps per epoch
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3]


@pytest.mark.parametrize("micro_batches, refused", [(1, False), (2, False), (8, False), (3, True), (16, True)])
def test_micro_batches_must_divide_the_batch(micro_batches, refused):
    overrides = ["data.batch_size_per_gpu=8", f"data.micro_batches={micro_batches}"]
    if refused:
        with pytest.raises(ConfigError, match=rf"^data.micro_batches={micro_batches}: must divide "
                                              r"data.batch_size_per_gpu \(8\) into equal micro-batches$"):
            load_config(None, overrides)
    else:
        assert load_config(None, overrides).data.micro_batches == micro_batches
