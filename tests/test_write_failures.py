"""A checkpoint write that fails (full disk, no permission) ends the run with one line naming the file being
written and confirming that the previous checkpoint is intact; that checkpoint still loads and resumes."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino import checkpoint, sharded_checkpoint
from fastdino.checkpoint import CheckpointWriteError
from fastdino.distributed import DistributedContext
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def full_disk_open(real_open=open):
    """`open` for the checkpoint writer whose files are /dev/full: every write fails with the kernel's ENOSPC."""

    def opener(path, mode="r", *args, **kwargs):
        return real_open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    return opener


def denied_open(path, mode="r", *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


class FillingFile:
    """A file on a disk that fills up after 1,000 bytes: write raises ENOSPC, while flush and close succeed (so
    the error is seen only where torch.save meets it, and torch.save turns it into a RuntimeError)."""

    def __init__(self, path, mode):
        self.handle, self.written = open(path, mode), 0

    def write(self, data):
        self.written += len(data)
        if self.written > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_save_atomic_reports_the_disk_error_that_torch_save_hides(tmp_path, monkeypatch):
    checkpoint.save_atomic({"weights": torch.zeros(4)}, tmp_path / "c.pth")
    monkeypatch.setattr(checkpoint, "open", FillingFile, raising=False)
    with pytest.raises(OSError) as error:
        checkpoint.save_atomic({"weights": torch.ones(10_000)}, tmp_path / "c.pth")
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(tmp_path / "c.pth")["weights"], torch.zeros(4))
    assert [path.name for path in tmp_path.iterdir()] == ["c.pth"]


@pytest.mark.parametrize("opener, reason", [(full_disk_open(), "No space left on device"),
                                            (denied_open, "Permission denied")])
def test_failed_write_names_the_file_and_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch, opener,
                                                                        reason):
    trainer = Trainer(tiny_config(images, tmp_path, "checkpoint_every=1"))
    trainer.train(stop_after_steps=1)  # checkpoint at step 1
    monkeypatch.setattr(checkpoint, "open", opener, raising=False)
    with pytest.raises(CheckpointWriteError) as error:
        trainer.train(stop_after_steps=2)
    message = str(error.value)
    assert f"could not write {tmp_path / checkpoint.LATEST}: {reason}" in message
    assert "(step 1) is intact and loads" in message and "\n" not in message
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / checkpoint.LATEST)["step"] == 1
    assert not [path for path in tmp_path.iterdir() if checkpoint.TEMPORARY_MARK in path.name]
    assert Trainer(tiny_config(images, tmp_path, "checkpoint_every=1")).step == 1


def test_failed_first_write_says_the_run_starts_over(images, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(images, tmp_path, "checkpoint_every=1"))
    monkeypatch.setattr(checkpoint, "open", full_disk_open(), raising=False)
    with pytest.raises(CheckpointWriteError, match="no checkpoint was written before: the same command starts"):
        trainer.train(stop_after_steps=1)


def test_failed_sharded_write_keeps_the_previous_sharded_checkpoint(images, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(images, tmp_path))
    trainer.train(stop_after_steps=1)
    path = tmp_path / sharded_checkpoint.SHARDED_DIR
    sharded_checkpoint.save_sharded(trainer.state_dict(), path, DistributedContext.single())

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # what a full disk reports when the shards are flushed
    with pytest.raises(OSError) as error:
        sharded_checkpoint.save_sharded(trainer.state_dict(), path, DistributedContext.single())
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sharded_checkpoint.read_plain(path)["config"]["output_dir"] == str(tmp_path)
    loaded = sharded_checkpoint.load_sharded(path, trainer.state_dict())
    assert loaded["step"] == 1 and torch.equal(loaded["dino_loss"]["center"], trainer.dino_loss.center)


FULL_DISK_RUN = """
import sys
import fastdino.checkpoint
writes = []
def opener(path, mode="r", *args, **kwargs):
    if "w" in mode and "checkpoint" in str(path):  # text files (config.yaml, logs) go through save_atomic too
        writes.append(path)
        if len(writes) > 2:  # the first two checkpoints fit, then the disk is full
            path = "/dev/full"
    return open(path, mode, *args, **kwargs)
fastdino.checkpoint.open = opener
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_train_command_says_one_line_on_a_full_disk(images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUN, f"data.path={images}", f"output_dir={tmp_path}", "model.arch=vit_tiny",
         "model.depth=1", "model.patch_size=8", "model.out_dim=64", "model.head_hidden_dim=32",
         "model.head_bottleneck_dim=16", "data.global_crop_size=16", "data.local_crop_size=8",
         "data.local_crops_number=2", "data.batch_size_per_gpu=4", "data.num_workers=0", "optim.epochs=2",
         "optim.warmup_epochs=1", "checkpoint_every=1", "saveckp_freq=0", "device=cpu"],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "could not write" in errors[0] and "No space left on device" in errors[0]
    assert "(step 2) is intact and loads" in errors[0]
    assert checkpoint.load(tmp_path / checkpoint.LATEST)["step"] == 2
