"""Precedence in every merge: where two sources of one value meet, they are made to differ and the winner checked
(a re-evaluated figure over the logged one, a stored run's settings over today's defaults, the current settings as
what a rerun changes to, overrides over the config file over the defaults)."""
import json

from fastdino import metrics
from fastdino.config import Config, load_config
from fastdino.resume_policy import changed_settings, check_resume, stored_settings
from fastdino.run_folder import METRICS_LOG


def test_a_re_evaluated_figure_replaces_the_logged_one_in_its_row_only(tmp_path):
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0, "knn_top1": 50.0, "epoch": 0}]
    (tmp_path / METRICS_LOG).write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics.add_to_row(tmp_path, 2, {"knn_top1": 61.5, "knn_top5": 90.0})
    written = [json.loads(line) for line in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert written == [{"step": 1, "loss": 9.0},
                       {"step": 2, "loss": 8.0, "knn_top1": 61.5, "epoch": 0, "knn_top5": 90.0}]


def test_a_stored_runs_settings_win_over_todays_defaults_and_a_missing_key_is_the_default():
    stored = {"optim": {"lr": 0.25, "epochs": 7}, "model": {"out_dim": 128}}  # an older run: most keys missing
    settings = stored_settings(stored)
    assert (settings["optim.lr"], settings["optim.epochs"], settings["model.out_dim"]) == (0.25, 7, 128)
    assert settings["optim.min_lr"] == Config().optim.min_lr and settings["seed"] == Config().seed


def test_a_key_added_later_takes_what_it_meant_then_unless_the_run_stored_it():
    older = {"data": {"global_crop_size": 96}}  # before model.pos_embed_size: the grid was the crop's
    assert stored_settings(older)["model.pos_embed_size"] == 96
    newer = {"data": {"global_crop_size": 96}, "model": {"pos_embed_size": 224}}
    assert stored_settings(newer)["model.pos_embed_size"] == 224


def test_a_rerun_reports_the_stored_value_then_the_current_one():
    current = load_config(None, ["log_every=5", "optim.epochs=150"])
    stored = {"log_every": 3, "optim": {"epochs": 100}}
    assert changed_settings(stored, current) == {"log_every": (3, 5), "optim.epochs": (100, 150)}
    assert check_resume(stored, current) == ["changed since the checkpoint, without effect on training: "
                                             "log_every 3 -> 5"]


def test_overrides_win_over_the_config_file_which_wins_over_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.1\n  epochs: 20\nseed: 4\n")
    config = load_config(path, ["optim.lr=0.2", "optim.lr=0.3"])
    assert (config.optim.lr, config.optim.epochs, config.seed) == (0.3, 20, 4)  # the last override wins
    assert config.optim.min_lr == Config().optim.min_lr
