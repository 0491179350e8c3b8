"""A run touches only what it can prove is its own: the user's files beside it (a git checkout, look-alike names)
survive every kind of start and rerun byte for byte, a folder holding a run's names without a run is refused, the
default output_dir is never the working directory, and the run folder records what ran."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    LOOK_ALIKES,
    assert_user_files_intact,
    files_under,
    plant_user_files,
    tiny_config,
    write_image_folder,
)

from fastdino import run_folder
from fastdino.config import load_config
from fastdino.resume_policy import RunChangedError
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", count=8)


def test_every_kind_of_start_leaves_the_users_files_alone(images, tmp_path):
    run = tmp_path / "project"
    run.mkdir()
    planted = plant_user_files(run)
    Trainer(tiny_config(images, run, "checkpoint_every=1")).train(stop_after_steps=1)  # fresh, then interrupted
    assert_user_files_intact(run, planted)
    Trainer(tiny_config(images, run, "checkpoint_every=1")).train(stop_after_steps=3)  # resumed
    assert_user_files_intact(run, planted)
    with pytest.raises(RunChangedError):  # a rerun with other settings
        Trainer(tiny_config(images, run, "optim.lr=0.01"))
    assert_user_files_intact(run, planted)
    own_before = {name for name in os.listdir(run) if run_folder.is_own(name)}
    Trainer(tiny_config(images, run, "resume=false")).train(stop_after_steps=1)  # starting over
    assert_user_files_intact(run, planted)
    replaced = [path for path in run.iterdir() if path.name.startswith(run_folder.REPLACED_PREFIX)]
    assert len(replaced) == 1 and set(os.listdir(replaced[0])) == own_before  # the old run's own entries, only
    assert {"checkpoint.pth", "config.yaml", "log.jsonl", "run_info.json", "tensorboard"} <= own_before
    # the line said before the run was accepted is in the new run's log, held until then
    assert "was moved to" in (run / run_folder.RUN_LOG).read_text()


def test_every_entry_a_finished_run_writes_is_its_own(images, tmp_path):
    """The names the run folder guards are all the names a run writes (a new file would otherwise be left behind by
    resume=false, or taken for the user's)."""
    from fastdino.report import final_report

    config = tiny_config(images, tmp_path / "run", "saveckp_freq=1", "eval.final_knn=true", "eval.knn_k=2",
                         "eval.image_size=16", "eval.attention_images=1", "eval.attention_image_size=16",
                         f"eval.knn_train_path={images}", f"eval.knn_val_path={images}")
    trainer = Trainer(config)
    trainer.train()
    final_report(config, trainer.teacher_backbone(), trainer.device, trainer.step)
    written = os.listdir(tmp_path / "run")
    assert {"checkpoint0000.pth", "results.json", "training_curves.png", "attention", "train.log"} <= set(written)
    assert [name for name in written if not run_folder.is_own(name)] == []


@pytest.mark.parametrize("name", ["config.yaml", "log.jsonl", "tensorboard/", "train.log", "results.json",
                                  "checkpoint0003.pth", "run_info.json"])
def test_a_folder_holding_a_runs_names_but_no_run_is_refused_and_left_alone(tmp_path, name):
    folder = tmp_path / "mine"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    if name.endswith("/"):
        (folder / name).mkdir()
    else:
        (folder / name).write_text('{"written_by": "somebody else"}\n')
    before = files_under(folder), sorted(os.listdir(folder))
    with pytest.raises(run_folder.ForeignFolderError, match=f"holds {name.rstrip('/')}, which a run writes"):
        run_folder.prepare(folder, start_over=True)
    assert (files_under(folder), sorted(os.listdir(folder))) == before


@pytest.mark.parametrize("record, usable", [({"written_by": "fastdino"}, True), ({"written_by": "fastdinos"}, False),
                                            ({"started_from": "a fresh run"}, False), ([], False)])
def test_the_run_record_proves_a_run_only_when_fastdino_wrote_it(tmp_path, record, usable):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / run_folder.RUN_INFO).write_text(json.dumps(record))
    if usable:
        run_folder.check_usable(tmp_path)
    else:
        with pytest.raises(run_folder.ForeignFolderError):
            run_folder.check_usable(tmp_path)


def test_a_checkpoint_proves_a_run(images, tmp_path):
    Trainer(tiny_config(images, tmp_path / "run", "checkpoint_every=1")).train(stop_after_steps=1)
    (tmp_path / "run" / run_folder.RUN_INFO).unlink()  # a run from before the record existed
    run_folder.check_usable(tmp_path / "run")


def test_a_file_as_output_dir_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(run_folder.ForeignFolderError, match="is a file, not a folder"):
        run_folder.check_usable(tmp_path / "out")


def test_only_the_runs_own_leftover_temporaries_are_removed(tmp_path):
    own = [".checkpoint.pth.tmp-123", ".log.jsonl.tmp-9", ".config.yaml.tmp-1", ".checkpoint0004.pth.tmp-77",
           ".checkpoint_dcp.tmp/", ".checkpoint0019_dcp.tmp/"]
    theirs = [name for name in LOOK_ALIKES if "/" not in name] + ["cache.tmp/", ".mine_dcp.tmp/", ".x.tmp-1"]
    for name in own + theirs:
        path = tmp_path / name.rstrip("/")
        path.mkdir() if name.endswith("/") else path.write_text(name)
    run_folder.prepare(tmp_path, start_over=False)
    left = set(os.listdir(tmp_path))
    assert not left & {name.rstrip("/") for name in own}
    assert {name.rstrip("/") for name in theirs} <= left


def test_start_over_in_a_folder_without_a_run_moves_nothing_and_says_nothing(tmp_path, caplog):
    planted = plant_user_files(tmp_path)
    with caplog.at_level(logging.INFO, logger="fastdino"):
        run_folder.prepare(tmp_path, start_over=True)
    assert_user_files_intact(tmp_path, planted)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(run_folder.REPLACED_PREFIX)]
    assert not [record for record in caplog.records if "moved" in record.getMessage()]
    assert any("leaves untouched" in record.getMessage() for record in caplog.records)


def test_output_dir_default_and_which_side_wins(tmp_path):
    recipe = tmp_path / "recipes" / "my_recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("seed: 1\n")
    assert load_config().output_dir == "runs/dino"
    assert load_config(recipe).output_dir == "runs/my_recipe"
    recipe.write_text("output_dir: elsewhere\n")
    assert load_config(recipe).output_dir == "elsewhere"  # the file wins over the recipe's default
    assert load_config(recipe, ["output_dir=cli"]).output_dir == "cli"  # an override wins over the file
    assert load_config(None, ["output_dir=cli"]).output_dir == "cli"


def _recipe(images: Path, path: Path) -> Path:
    settings = {
        "model": {"arch": "vit_tiny", "depth": 1, "patch_size": 8, "out_dim": 64, "head_hidden_dim": 32,
                  "head_bottleneck_dim": 16},
        "data": {"path": str(images), "global_crop_size": 16, "local_crop_size": 8, "local_crops_number": 2,
                 "batch_size_per_gpu": 4, "num_workers": 0},
        "optim": {"epochs": 1, "warmup_epochs": 0}, "device": "cpu"}
    path.write_text(yaml.safe_dump(settings))
    return path


def test_a_run_started_in_a_project_with_resume_false_moves_nothing_of_it(images, tmp_path):
    """The new user's report: from a project folder, `train.py --config my.yaml resume=false` with no output_dir
    moved the whole checkout, .git included. Now the run goes to runs/my/ and the checkout is untouched."""
    project = tmp_path / "project"
    project.mkdir()
    _recipe(images, project / "my.yaml")
    planted = plant_user_files(project)
    command = [sys.executable, str(REPO / "train.py"), "--config", "my.yaml", "resume=false"]
    for attempt in range(2):
        done = subprocess.run(command, cwd=project, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert_user_files_intact(project, planted)
        assert (project / "runs" / "my" / "checkpoint.pth").is_file()
        moved = [line for line in done.stderr.splitlines() if "was moved to" in line]
        assert len(moved) == attempt and all("runs/my was moved to runs/my/replaced-" in line for line in moved)
    assert set(os.listdir(project)) == {path.split("/")[0] for path in planted} | {"runs"}


def test_the_run_folder_records_what_ran(images, tmp_path):
    trainer = Trainer(tiny_config(images, tmp_path / "run", "optim.lr=0.0008"))
    record = json.loads((tmp_path / "run" / run_folder.RUN_INFO).read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    expected = {
        "written_by": "fastdino", "started_from": "a fresh run", "world_size": 1, "strategy": "none",
        "precision": "fp32", "images": 8, "classes": 2, "steps_per_epoch": 2, "total_steps": 4, "total_batch": 4,
        "effective_lr": 0.0008 * 4 / 256,
        "student_parameters": sum(param.numel() for param in trainer.student.parameters()),
        "attention": "one forward per crop size, math attention",
    }
    assert {key: record[key] for key in expected} == expected
    environment = record["environment"]
    assert environment["versions"]["torch"] == torch.__version__
    assert environment["git_commit"].removesuffix("+dirty") == commit
    assert environment["device"].startswith("cpu-") and environment["device_memory_gib"] > 0
    assert record["fast_paths"]["fused_loss"] == "off (auto: needs CUDA)"
    log_lines = (tmp_path / "run" / run_folder.RUN_LOG).read_text()
    for needle in ("a fresh run; fastdino", "8 images in 2 class folders, 2 steps per epoch of 4 images (4 steps in all), "
                   "lr 1.25e-05",
                   "attention: one forward per crop size, math attention; fast paths:", "fused_loss: off"):
        assert needle in log_lines
