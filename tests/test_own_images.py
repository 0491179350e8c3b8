"""Training on a user's own images: what the start says about the folder (images used, loose images left out), where
relative paths are read from, and a kNN the recipe asks for on folders the user did not name."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config
from PIL import Image

from fastdino.config import ConfigError, load_config
from fastdino.preflight import check_data, unnamed_knn_data
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (9, 99, 199)).save(path)


@pytest.fixture
def mixed(tmp_path):
    """2 class folders holding 3 images, and 2 images (plus a text file) loose beside them."""
    for name in ("a/1.jpg", "a/sub/2.png", "b/3.jpg", "loose1.jpg", "loose2.png"):
        _image(tmp_path / "mixed" / name)
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    return tmp_path / "mixed"


def test_the_start_counts_the_images_used_and_names_the_loose_ones_left_out(mixed, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fastdino"):
        check_data(load_config(None, [f"data.path={mixed}", "data.batch_size_per_gpu=3"]))
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert lines == [
        ("WARNING", f"data.path={mixed}: 2 images directly in it (loose1.jpg, loose2.png) are not used: beside class "
                    "folders, only the images inside them count; move them into a folder to train on them")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdino"):
        Trainer(tiny_config(mixed, tmp_path / "run", "data.batch_size_per_gpu=3"))
    assert any(record.getMessage().startswith("3 images in 2 class folders, 1 steps per epoch of 3 images")
               for record in caplog.records)


def test_a_flat_folder_uses_every_image_and_warns_of_nothing(mixed, tmp_path, caplog):
    flat = mixed.parent / "flat"
    for index in range(3):
        _image(flat / f"{index}.jpg")
    with caplog.at_level(logging.INFO, logger="fastdino"):
        check_data(load_config(None, [f"data.path={flat}", "data.batch_size_per_gpu=3"]))
        assert caplog.records == []
        Trainer(tiny_config(flat, tmp_path / "run", "data.batch_size_per_gpu=3"))
    assert any(record.getMessage().startswith("3 images, 1 steps per epoch") for record in caplog.records)


def test_a_missing_relative_path_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"^data.path=images/train: .* \(relative paths are read from the working "
                                          rf"directory, {tmp_path}\)$"):
        check_data(load_config(None, ["data.path=images/train"]))
    with pytest.raises(ConfigError) as absolute:
        check_data(load_config(None, [f"data.path={tmp_path}/missing"]))
    assert "working directory" not in str(absolute.value)


KNN = ["eval.final_knn=true", "eval.knn_train_path=digits/train", "eval.knn_val_path=digits/val"]


@pytest.mark.parametrize("named, knn, warned", [
    ({"data.path"}, KNN, True),
    ({"data.path", "eval.knn_train_path"}, KNN, False),
    ({"data.path", "eval.knn_val_path"}, KNN, False),
    (set(), KNN, False),  # the file names both: the recipe's own data and kNN
    ({"data.path"}, ["eval.knn_every_epochs=2", *KNN[1:]], True),
    ({"data.path"}, [], False),
])
def test_a_knn_on_folders_the_user_did_not_name_is_said_before_training(named, knn, warned):
    config = load_config(None, ["data.path=mine", *knn])
    warning = unnamed_knn_data(config, named)
    assert bool(warning) == warned
    if warned:
        assert "eval.knn_train_path=digits/train and eval.knn_val_path=digits/val from the config file, not on " \
               "data.path=mine" in warning


def test_the_knn_warning_comes_through_the_command_line_before_training(mixed, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"eval: {{final_knn: true, knn_train_path: {mixed}, knn_val_path: {mixed}, knn_k: 2, "
                      "image_size: 16}\nmodel: {arch: vit_tiny, depth: 1, patch_size: 8, out_dim: 64, "
                      "head_hidden_dim: 32, head_bottleneck_dim: 16}\ndata: {global_crop_size: 16, local_crop_size: 8, "
                      "local_crops_number: 2, batch_size_per_gpu: 3, num_workers: 0}\noptim: {epochs: 1, "
                      "warmup_epochs: 0}\ndevice: cpu\n")
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(recipe), f"data.path={mixed}"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    warned = next(index for index, line in enumerate(lines) if "eval.final_knn=true evaluates on" in line)
    started = next(index for index, line in enumerate(lines) if "a fresh run; fastdino" in line)
    assert warned < started
