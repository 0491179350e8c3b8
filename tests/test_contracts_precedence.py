"""Precedence in every merge: where two sources of one value meet, they are made to differ and the winner checked
(a re-evaluated figure over the logged one, a stored run's settings over today's defaults, the current settings as
what a rerun changes to, overrides over the config file over the defaults, a resumed run's rows over those logged
after its checkpoint, in log.jsonl and in TensorBoard)."""
import json

from fastdino import metrics
from fastdino.config import Config, config_to_dict, load_config
from fastdino.resume_policy import changed_settings, check_resume, step_by_images_seen, stored_settings
from fastdino.run_folder import METRICS_LOG, TENSORBOARD


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


def test_a_checkpoint_holding_lists_where_the_config_has_tuples_changed_nothing():
    stored = config_to_dict(Config())
    stored["data"]["global_crops_scale"] = list(stored["data"]["global_crops_scale"])  # as YAML or JSON hold it
    assert isinstance(config_to_dict(Config())["data"]["global_crops_scale"], tuple)
    assert changed_settings(stored, Config()) == {}


def test_a_change_of_how_the_same_algorithm_is_computed_is_the_second_note():
    current = load_config(None, ["log_every=5", "precision=fp32"])
    stored = {"log_every": 3, "precision": "bf16"}
    assert check_resume(stored, current) == [
        "changed since the checkpoint, without effect on training: log_every 3 -> 5",
        "changed since the checkpoint: precision 'bf16' -> 'fp32'; the same algorithm continues, but not "
        "bit-identically to an uninterrupted run"]


def test_a_checkpoint_from_before_the_batch_was_stored_continues_at_its_step_without_a_note():
    assert step_by_images_seen({"step": 7, "rng": [None]}, 1, 4, 10) == (7, "")


def test_another_batch_continues_by_images_seen_and_says_so():
    # 2 processes x 4 images, 5 steps an epoch; step 13 = epoch 2, 3 steps of 8 images in: image 24 of epoch 2, which
    # at 1 x 4 images and 10 steps an epoch is step 2 * 10 + 24 / 4 = 26
    state = {"step": 13, "world_size": 2, "global_batch": 8, "steps_per_epoch": 5, "rng": [None, None]}
    assert step_by_images_seen(state, 1, 4, 10) == (26, (
        "resuming a run saved at 2 x 4 (processes x batch per process) with 1 x 4: continuing by images seen, at "
        "image 24 of epoch 2 (step 13 there, step 26 here); the lr follows the new total batch"))


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard shows the run's scalars (its purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_what_a_resumed_run_logs_again_replaces_what_was_logged_after_its_checkpoint_in_tensorboard_too(tmp_path):
    first = metrics.MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        first.log({"step": step, "loss": float(step), "lr": 0.5, "phase": "warmup"})
    first.close()
    assert tensorboard_scalars(tmp_path) == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0)],
                                             "lr": [(1, 0.5), (2, 0.5), (3, 0.5)]}
    again = metrics.MetricsLogger(tmp_path, resumed_at=1)
    again.log({"step": 2, "loss": 20.0, "lr": 0.25, "phase": "warmup"})
    again.close()
    assert tensorboard_scalars(tmp_path) == {"loss": [(1, 1.0), (2, 20.0)], "lr": [(1, 0.5), (2, 0.25)]}
    metrics.MetricsLogger(tmp_path, tensorboard=False).close()  # no resumed_at: a fresh start, which keeps no row
    assert (tmp_path / METRICS_LOG).read_text() == ""
