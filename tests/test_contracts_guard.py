"""Every action of every mode: what guard.action=stop and =warn do at each kind of event (a collapse of each mode
stops under stop; a recovery, a quiet reading and the final kNN's warning never stop), and each resume rule's allowed
and refused case through the training command."""
import logging
import math
import shutil

import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino import report, train
from fastdino.config import load_config
from fastdino.guard import Guard, GuardEvent, GuardStop, replay
from fastdino.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


EVENTS = [("uniform", True), ("one_hot", True), ("drift", True), ("", False), (None, False)]


@pytest.mark.parametrize("action", ["stop", "warn"])
@pytest.mark.parametrize("mode, stops", EVENTS, ids=["uniform", "one-hot", "drift", "recovery", "no event"])
def test_what_each_event_does_under_each_action(images, tmp_path, monkeypatch, caplog, action, mode, stops):
    """The guard reports `mode` at step 2 (monitor_every=1); the run stops there, with a checkpoint, only for a
    collapse under guard.action=stop."""
    trainer = Trainer(tiny_config(images, tmp_path, "monitor_every=1", f"guard.action={action}"))
    event = None if mode is None else GuardEvent(mode, f"guard: event {mode!r}")
    monkeypatch.setattr(trainer.guard, "observe", lambda step, *readings: event if step == 2 else None)
    monkeypatch.setattr(trainer.guard, "mode", mode or "uniform")  # what stop_line names
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        if stops and action == "stop":
            with pytest.raises(GuardStop):
                trainer.train(stop_after_steps=3)
            assert trainer.step == 2 and trainer.last_checkpoint == tmp_path / "checkpoint.pth"
        else:
            trainer.train(stop_after_steps=3)
            assert trainer.step == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == ([] if event is None else [event.line])


@pytest.mark.parametrize("action", ["stop", "warn"])
def test_a_final_knn_below_random_init_warns_and_never_stops(images, tmp_path, monkeypatch, caplog, action):
    config = tiny_config(images, tmp_path / "run", "eval.final_knn=true", f"eval.knn_train_path={images}",
                         f"eval.knn_val_path={images}", "eval.image_size=16", f"guard.action={action}")
    (tmp_path / "run").mkdir()
    figures = iter([10.0, 50.0])  # trained, random init
    monkeypatch.setattr(report, "knn_top1", lambda *args: next(figures))
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        results = report.final_report(config, torch.nn.Identity(), torch.device("cpu"), 8)
    assert results["knn_top1_trained"] == 10.0
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert [line.split(":")[0] for line in warnings] == ["training made the features worse"]


# ------------------------------------------------------------------------------------------------ the guard's edges
def edge_guard():
    """band 0.25 and drift 0.5 of ln K: the edges below are exact in floating point."""
    return Guard(load_config(None, ["model.out_dim=1024", "guard.band=0.25", "guard.drift=0.5", "guard.patience=0",
                                    "output_dir=/runs/edge"]))


def test_each_mode_holds_at_the_equality_of_its_threshold():
    """Uniform at entropy >= (1 - band) ln K with KL <= band ln K; one-hot at entropy <= band ln K; the drift at
    entropy - lowest >= drift ln K: each equality case is the mode."""
    guard = edge_guard()
    ln_k = math.log(1024)
    near = 0.25 * ln_k
    assert guard.classify(ln_k - near, near) == "uniform"
    assert guard.classify(near, 5.0) == "one_hot"
    drift = 0.5 * ln_k
    guard.observe(1, drift, 5.0)  # the lowest entropy so far
    assert guard.classify(2 * drift, 5.0) == "drift"  # 2 drift - drift == drift exactly


def test_the_drift_line_says_where_the_entropy_rose_from_and_the_stop_line_where_the_run_moves():
    guard = edge_guard()
    ln_k = math.log(1024)
    guard.observe(1, 0.5 * ln_k, 5.0)
    event = guard.observe(2, ln_k, 5.0)
    assert event.mode == "drift" and "guard: drift toward uniform at step 2: teacher entropy 6.931 (ln K = 6.93), " \
        "teacher-student KL 5.0000, up from 3.466, for 0 steps" in event.line, event.line
    assert "rerun with resume=false and e.g. " in guard.stop_line(2, "ckpt")
    assert "(this run moves into /runs/edge/replaced-<date>/)" in guard.stop_line(2, "ckpt")


def test_replay_skips_the_rows_that_measured_only_one_monitor():
    rows = [{"step": 1, "teacher_entropy": 0.1}, {"step": 2, "teacher_student_kl": 0.1},
            {"step": 3, "teacher_entropy": 0.1, "teacher_student_kl": 2.0}]
    assert replay(edge_guard().config, rows).state_dict() == {"mode": "one_hot", "candidate": "one_hot", "since": 3,
                                                              "lowest": 0.1}


# ------------------------------------------------------------------------------------------------ resume rules
@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished 2-epoch run (8 steps); its config.yaml is the command's --config."""
    run = tmp_path_factory.mktemp("finished")
    Trainer(tiny_config(images, run)).train()
    return run


RULES = [  # (override, allowed, what the command says)
    ("log_every=2", True, "log_every 1 -> 2"),
    ("precision=fp32", True, "the same algorithm continues, but not bit-identically"),
    ("data.batch_size_per_gpu=2", True, "continuing by images seen"),
    ("optim.epochs=3", True, "optim.epochs 2 -> 3"),
    ("optim.epochs=1", False, "optim.epochs 2 -> 1"),
    ("optim.lr=0.001", False, "optim.lr 0.0005 -> 0.001"),
]


@pytest.mark.parametrize("override, allowed, said", RULES, ids=[case[0] for case in RULES])
def test_each_resume_rule_through_the_command(finished, tmp_path, capsys, caplog, override, allowed, said):
    run = shutil.copytree(finished, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="fastdino")
    command = ["--config", str(run / "config.yaml"), f"output_dir={run}", override]
    if allowed:
        assert train.main(command) == 0 and said in caplog.text, caplog.text
    else:
        with pytest.raises(SystemExit) as stop:
            train.main(command)
        error = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and said in error[-1] and "another output_dir" in error[-1], error
