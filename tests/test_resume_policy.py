"""A rerun into an existing run's folder never silently reuses or corrupts it: a change of what is trained stops with
the differing keys; a change that does not touch the trajectory, or extends it, proceeds and says so; a new batch
or world size continues by images seen; Ctrl-C is one line saying where the same command resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, tiny_config, write_image_folder

from fastdino import checkpoint
from fastdino.config import config_to_dict
from fastdino.resume_policy import RunChangedError, check_resume
from fastdino.schedules import Schedules
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def tiny_arguments(images, output_dir, *extra):
    return [f"data.path={images}", f"output_dir={output_dir}", "model.arch=vit_tiny", "model.depth=1",
            "model.patch_size=8", "model.out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
            "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=2",
            "data.batch_size_per_gpu=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
            "log_every=1", "device=cpu", *extra]


# ------------------------------------------------------------------------------------------ the rule itself
@pytest.mark.parametrize("override, allowed", [
    ("log_every=3", True), ("checkpoint_every=5", True), ("eval.knn_k=7", True), ("data.num_workers=2", True),
    ("output_dir=elsewhere", True), ("fast.fused_loss=false", True), ("precision=fp32", True),
    ("model.attention=math", True), ("distributed.strategy=ddp", True), ("data.batch_size_per_gpu=8", True),
    ("optim.epochs=3", True), ("optim.epochs=1", False), ("optim.lr=0.1", False), ("model.depth=2", False),
    ("dino.center_momentum=0.5", False), ("seed=3", False), ("data.local_crops_number=4", False),
    ("model.out_dim=32", False), ("guard.action=stop", True), ("guard.patience=3", True),
])
def test_which_changes_a_rerun_may_make(images, tmp_path, override, allowed):
    stored = config_to_dict(tiny_config(images, tmp_path))
    changed = tiny_config(images, tmp_path, override)
    if allowed:
        check_resume(stored, changed)
    else:
        with pytest.raises(RunChangedError, match=override.split("=")[0]):
            check_resume(stored, changed)


def test_a_key_the_stored_config_lacks_counts_as_its_default(images, tmp_path):
    stored = config_to_dict(tiny_config(images, tmp_path))
    del stored["resume"], stored["dino"]["student_temp"]  # a checkpoint of an older version
    assert check_resume(stored, tiny_config(images, tmp_path)) == []


def test_a_run_from_before_pos_embed_size_had_a_crop_sized_grid(images, tmp_path):
    """Older runs sized the position grid to the global crop: that, not today's 224 default, is what they hold."""
    stored = config_to_dict(tiny_config(images, tmp_path))
    del stored["model"]["pos_embed_size"]
    assert check_resume(stored, tiny_config(images, tmp_path, "model.pos_embed_size=16")) == []
    with pytest.raises(RunChangedError, match=r"model.pos_embed_size 16 -> 224"):
        check_resume(stored, tiny_config(images, tmp_path))


# ------------------------------------------------------------------------------------------ through the trainer
@pytest.fixture
def finished_run(images, tmp_path):
    Trainer(tiny_config(images, tmp_path / "run")).train()
    return tmp_path / "run"


def listing(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_other_settings_stop_with_one_line_and_touch_nothing(images, finished_run):
    before = listing(finished_run)
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *tiny_arguments(images, finished_run, "dino.center_momentum=0.99", "optim.lr=0.012")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for fragment in ("dino.center_momentum 0.9 -> 0.99", "optim.lr 0.0005 -> 0.012", "another output_dir",
                     "resume=false"):
        assert fragment in errors[0], errors[0]
    assert listing(finished_run) == before


def test_another_model_is_refused_before_its_weights_are_read(images, finished_run):
    with pytest.raises(RunChangedError, match=r"model.depth 1 -> 3"):
        Trainer(tiny_config(images, finished_run, "model.depth=3"))


def test_more_epochs_extend_the_run_with_the_schedules_recomputed(images, finished_run, caplog):
    caplog.set_level("INFO", logger="fastdino")
    config = tiny_config(images, finished_run, "optim.epochs=3")
    trainer = Trainer(config)
    assert trainer.step == 8  # 16 images, batch 4: 4 steps per epoch
    assert "optim.epochs 2 -> 3" in caplog.text and "recomputed for 3 epochs" in caplog.text
    trainer.train()
    assert trainer.step == 12
    expected = Schedules(config, steps_per_epoch=4).lr[11]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(float(expected), rel=0, abs=0)


def test_a_change_that_does_not_touch_training_continues_bit_identically(images, tmp_path, caplog):
    caplog.set_level("INFO", logger="fastdino")
    straight = Trainer(tiny_config(images, tmp_path / "straight", "checkpoint_every=1"))
    straight.train()
    Trainer(tiny_config(images, tmp_path / "resumed", "checkpoint_every=1")).train(stop_after_steps=3)
    resumed = Trainer(tiny_config(images, tmp_path / "resumed", "checkpoint_every=1", "log_every=2",
                                  "monitor_every=3"))
    assert "without effect on training: log_every 1 -> 2, monitor_every" in caplog.text
    resumed.train()
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name
    assert torch.equal(straight.dino_loss.center, resumed.dino_loss.center)


def test_resume_false_starts_over_and_keeps_the_old_run(images, finished_run):
    old_log = (finished_run / "log.jsonl").read_text()
    trainer = Trainer(tiny_config(images, finished_run, "resume=false", "optim.lr=0.01"))
    assert trainer.step == 0
    replaced = [path for path in finished_run.iterdir() if path.name.startswith("replaced-")]
    assert len(replaced) == 1 and (replaced[0] / "log.jsonl").read_text() == old_log
    assert checkpoint.load(replaced[0] / checkpoint.LATEST)["step"] == 8
    assert not (finished_run / checkpoint.LATEST).exists() and not (finished_run / "log.jsonl").exists()
    trainer.train(stop_after_steps=1)
    assert [json.loads(line)["step"] for line in (finished_run / "log.jsonl").read_text().splitlines()] == [1]


def test_a_larger_batch_continues_by_images_seen(images, tmp_path, caplog):
    caplog.set_level("INFO", logger="fastdino")
    Trainer(tiny_config(images, tmp_path, "checkpoint_every=1", "optim.epochs=3")).train(stop_after_steps=7)
    # 16 images at batch 4: 4 steps per epoch, so step 7 is 3 steps (12 images) into epoch 1
    trainer = Trainer(tiny_config(images, tmp_path, "checkpoint_every=1", "optim.epochs=3",
                                  "data.batch_size_per_gpu=8"))
    assert trainer.step == 2 * 1 + 12 // 8  # epoch 1 of 2 steps, one whole batch of 8 of its 12 images seen
    assert "continuing by images seen, at image 12 of epoch 1 (step 7 there, step 3 here)" in caplog.text
    trainer.train()
    assert trainer.step == 6


def test_torchrun_continues_a_one_process_run_by_images_seen(images, tmp_path):
    Trainer(tiny_config(images, tmp_path, "checkpoint_every=1")).train(stop_after_steps=2)  # 8 of 16 images
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "train.py"), *tiny_arguments(images, tmp_path, "checkpoint_every=1", "monitor_every=2")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved at 1 x 4 (processes x batch per process) with 2 x 4: continuing by images seen, at image 8 of " \
           "epoch 0 (step 2 there, step 1 here)" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # the 1-process run's steps up to the one it continues from, then the 2-process steps, each once
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_ctrl_c_is_one_line_that_says_where_the_run_resumes(images, tmp_path):
    arguments = tiny_arguments(images, tmp_path, "optim.epochs=50", "checkpoint_every=2")
    arguments[arguments.index("data.num_workers=0")] = "data.num_workers=2"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / checkpoint.LATEST).exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stderr
    resumes_from = int(lines[0].rsplit("resumes from step ", 1)[1])
    assert resumes_from == checkpoint.load(tmp_path / checkpoint.LATEST)["step"] > 0
