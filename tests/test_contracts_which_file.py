"""Which file wins: of a plain and a sharded checkpoint the more recent, of a sharded save cut between its renames
the complete predecessor, never an incomplete folder; and a kNN feature cache only for the same weights, images and
settings (each changed in turn is recomputed)."""
import argparse
import os
import shutil

import pytest
import torch

from fastdino import checkpoint, sharded_checkpoint
from fastdino.distributed import DistributedContext
from fastdino.eval import knn


def sharded_state(step):
    return {"student": {"w": torch.full((2,), float(step))}, "step": step, "rng": [], "config": {}}


@pytest.fixture
def both(tmp_path):
    """A run folder with checkpoint.pth and checkpoint_dcp/; returns a function that sets their ages."""
    checkpoint.save_atomic({"step": 1}, tmp_path / checkpoint.LATEST)
    sharded = tmp_path / sharded_checkpoint.SHARDED_DIR
    sharded_checkpoint.save_sharded(sharded_state(2), sharded, DistributedContext.single())

    def ages(plain, dcp):
        os.utime(tmp_path / checkpoint.LATEST, (plain, plain))
        os.utime(sharded / sharded_checkpoint.PLAIN_FILE, (dcp, dcp))
    return tmp_path, ages


def test_the_more_recent_of_plain_and_sharded_wins(both):
    folder, ages = both
    ages(plain=2_000_000, dcp=1_000_000)
    assert sharded_checkpoint.find_resume_checkpoint(folder) == folder / checkpoint.LATEST
    ages(plain=1_000_000, dcp=2_000_000)
    assert sharded_checkpoint.find_resume_checkpoint(folder) == folder / sharded_checkpoint.SHARDED_DIR


def test_an_incomplete_sharded_folder_never_wins(both):
    folder, ages = both
    ages(plain=1_000_000, dcp=2_000_000)
    (folder / sharded_checkpoint.SHARDED_DIR / ".metadata").unlink()  # a folder without its metadata
    assert sharded_checkpoint.find_resume_checkpoint(folder) == folder / checkpoint.LATEST


def test_a_save_cut_between_its_renames_resumes_from_the_predecessor(tmp_path):
    target = tmp_path / sharded_checkpoint.SHARDED_DIR
    sharded_checkpoint.save_sharded(sharded_state(1), target, DistributedContext.single())
    staging, old = sharded_checkpoint._staging_paths(target)
    shutil.copytree(target, staging)
    (staging / sharded_checkpoint.PLAIN_FILE).unlink()  # the next save, killed before it completed its folder
    target.rename(old)  # ... and after moving the published one aside
    assert sharded_checkpoint.find_resume_checkpoint(tmp_path) == old
    sharded_checkpoint.finish_interrupted_publish(target)
    assert sharded_checkpoint.find_resume_checkpoint(tmp_path) == target and not old.exists()
    assert sharded_checkpoint.read_unsharded(target, ("step",))["step"] == 1


# ------------------------------------------------------------------------------------------------ kNN cache
@pytest.fixture
def cache_setup(tmp_path, monkeypatch):
    """A checkpoint file, a folder of two images, the command's arguments, and a counter of feature extractions."""
    weights, folder = tmp_path / "teacher.pth", tmp_path / "images" / "class0"
    checkpoint.save_atomic({"w": torch.zeros(2)}, weights)
    folder.mkdir(parents=True)
    for index in range(2):
        (folder / f"{index}.jpg").write_bytes(b"image %d" % index)
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), arch="vit_tiny", patch_size=8,
                              checkpoint_key="teacher", image_size=16, amp=False, checkpoint=str(weights),
                              batch_size=2, num_workers=0)
    extracted = []

    def extract(*arguments):
        extracted.append(1)
        return torch.full((2, 3), float(len(extracted))), torch.tensor([0, 1])

    monkeypatch.setattr(knn, "extract_dataset_features", extract)

    def features():
        found, _ = knn._cached_dataset_features(None, [0, 1], args, torch.device("cpu"), str(folder.parent))
        return float(found[0, 0])
    return weights, folder, args, features


def test_the_cache_is_used_for_the_same_weights_images_and_settings(cache_setup):
    *_, features = cache_setup
    assert features() == 1 and features() == 1


@pytest.mark.parametrize("change", ["weights", "image", "new image", "image_size", "checkpoint_key", "arch", "amp"])
def test_the_cache_is_recomputed_when_anything_it_depends_on_changes(cache_setup, change):
    weights, folder, args, features = cache_setup
    assert features() == 1
    if change == "weights":
        checkpoint.save_atomic({"w": torch.ones(2)}, weights)
        os.utime(weights, ns=(os.stat(weights).st_mtime_ns + 10**9,) * 2)
    elif change == "image":  # the same names and count, other pixels
        (folder / "0.jpg").write_bytes(b"IMAGE 0")
        os.utime(folder / "0.jpg", ns=(os.stat(folder / "0.jpg").st_mtime_ns + 10**9,) * 2)
    elif change == "new image":  # one image replaced by another name
        (folder / "0.jpg").rename(folder / "2.jpg")
    else:
        setattr(args, change, {"image_size": 32, "checkpoint_key": "student", "arch": "vit_small", "amp": True}[change])
    assert features() == 2
