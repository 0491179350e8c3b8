"""The collapse guard: it names uniform collapse, one-hot collapse and the drift back toward uniform once they hold,
and the recovery from them; its defaults classify the README's demo runs as measured; a real run that collapses is
caught (and, with guard.action=stop, ended with a checkpoint and advice that works); the demo's over-sharpening is
reported with its recovery while training goes on; the monitors appear only in the rows that measured them."""
import json
import logging
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from helpers import run_on_two_ranks, tiny_config, write_image_folder

import train

from fastdino import checkpoint, report, sharded_checkpoint
from fastdino.config import load_config
from fastdino.data.demo_dataset import materialize_demo_dataset
from fastdino.distributed import DistributedContext
from fastdino.eval.plots import training_curves_figure
from fastdino.guard import EXIT_GUARD_STOP, HINTS, Guard, GuardStop, replay
from fastdino.resume_policy import RunChangedError
from fastdino.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
LN_K = math.log(1024)  # the demo's out_dim

# (step, teacher entropy, teacher-student KL) as logged by configs/demo.yaml runs (2 CPU cores, torch 2.14.1):
# `make demo` itself, which over-sharpens and recovers (61.4% kNN against 50.1% at random init) ...
DEMO = [(5, 4.55, 1.07), (10, 3.774, 0.734), (15, 2.21, 0.511), (20, 0.7796, 0.176), (25, 0.1452, 0.04),
        (30, 0.03373, 0.0272), (35, 0.01054, 0.023), (40, 0.005012, 0.019), (45, 0.003435, 0.0155),
        (50, 0.003024, 0.0128), (55, 0.003246, 0.0107), (60, 0.003943, 0.00909), (65, 0.0052, 0.00777),
        (70, 0.00741, 0.00654), (75, 0.01081, 0.00537), (80, 0.01634, 0.00413), (85, 0.02495, 0.00285),
        (90, 0.03861, 0.00159), (95, 0.05994, 0.000644), (100, 0.09282, 0.000648), (105, 0.1439, 0.00289),
        (110, 0.2214, 0.00977), (115, 0.338, 0.0255), (120, 0.5041, 0.0559), (125, 0.74, 0.111),
        (130, 1.058, 0.203), (135, 1.474, 0.35), (140, 1.987, 0.565)]
# ... with the paper's dino.center_momentum=0.9 (read every step; every 6th shown) ...
CENTER_09 = [(6, 5.513, 0.699), (12, 6.103, 0.43), (18, 6.597, 0.189), (24, 6.803, 0.0729), (30, 6.868, 0.0319),
             (36, 6.891, 0.0138), (42, 6.898, 0.00749), (48, 6.903, 0.0047), (54, 6.907, 0.0033),
             (60, 6.911, 0.00254), (90, 6.926, 0.00162), (120, 6.93, 0.00129), (144, 6.93, 0.00152)]
# ... and with the teacher temperature warmed up to 0.07 over 4 epochs (read every 2 steps, each logged 1 step
# late, as the monitors were before they were written in their own step's row; every 6th shown)
TEMP_07 = [(6, 4.55, 1.07), (12, 3.645, 0.76), (18, 1.466, 0.353), (24, 1.365, 0.1), (30, 0.5818, 0.0178),
           (36, 0.2785, 0.00807), (42, 0.7612, 0.0232), (48, 0.6567, 0.00764), (54, 0.6817, 0.00469),
           (60, 2.126, 0.0784), (66, 2.593, 0.0493), (72, 3.17, 0.0255), (78, 3.789, 0.00689), (84, 4.431, 0.00377),
           (90, 5.007, 0.00132), (96, 5.494, 0.000828), (102, 5.876, 0.00232), (108, 6.154, 0.00129),
           (114, 6.356, 0.00136), (120, 6.499, 0.00219), (126, 6.603, 0.00366), (132, 6.675, 0.00584),
           (138, 6.73, 0.00952), (144, 6.77, 0.015)]


@pytest.fixture(autouse=True)
def one_thread():
    """The real runs below take a third of the time with one thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def guard(*overrides: str) -> Guard:
    return Guard(load_config(None, ["model.out_dim=1024", *overrides]))


def events(watcher: Guard, readings) -> list[tuple[int, str]]:
    """(step, mode) of every event, "" for a recovery."""
    found = []
    for step, entropy, kl in readings:
        event = watcher.observe(step, entropy, kl)
        if event is not None:
            found.append((step, event.mode))
    return found


def ramp(values, kl) -> list[tuple[int, float, float]]:
    """Readings every 5 steps from step 0, all with the same KL."""
    return [(5 * index, value, kl) for index, value in enumerate(values)]


# ------------------------------------------------------------------------------------ synthetic sequences
@pytest.mark.parametrize("readings, expected", [
    # entropy up to ln K with the KL near 0, held from step 15; back to an informative 3.0 from step 35
    (ramp([4.5, 5.5, 6.2, 6.7, 6.9, 6.92, 6.93, 3.0, 2.8, 2.6, 2.5], 0.01), [(25, "uniform"), (45, "")]),
    # entropy down to 0, held from step 10; back up from step 30
    (ramp([4.5, 2.0, 0.2, 0.01, 0.005, 0.01, 1.5, 1.8, 2.0, 2.2], 0.01), [(20, "one_hot"), (40, "")]),
    # informative (0.5) by step 10, then back up past 0.5 + ln K / 2 from step 30, then uniform from step 50
    (ramp([4.5, 2.0, 0.5, 1.0, 2.5, 3.5, 4.2, 5.0, 5.8, 6.4, 6.7, 6.9, 6.93, 6.93], 0.01),
     [(40, "drift"), (60, "uniform")]),
])
def test_each_mode_is_reported_once_it_holds_and_so_is_the_recovery(readings, expected):
    assert events(guard(), readings) == expected


def test_uniform_needs_the_kl_near_0_too():
    """Entropy near ln K while the student still disagrees with the teacher is not (yet) a collapse."""
    assert events(guard(), ramp([6.9] * 6, 1.0)) == []


def test_a_mode_shorter_than_patience_or_a_healthy_run_says_nothing():
    dip = ramp([4.5, 3.0, 0.1, 0.1, 1.5, 1.8, 2.0, 2.0], 0.2)  # near 0 at steps 10-15 only
    assert events(guard(), dip) == []
    assert events(guard("guard.patience=5"), dip) == [(15, "one_hot"), (25, "")]
    assert events(guard(), ramp([4.5, 3.5, 2.5, 2.0, 1.8, 1.7, 1.6, 1.6], 0.4)) == []


@pytest.mark.parametrize("readings, expected", [
    (DEMO, [(35, "one_hot"), (130, "")]),  # `make demo`: over-sharpens, then recovers
    (CENTER_09, [(30, "uniform")]),  # the README's "uniform collapse by step 40"
    (TEMP_07, [(90, "drift"), (138, "uniform")]),  # "0.25 at step 40, then -> 6.1 by step 110"
])
def test_the_defaults_read_the_readmes_demo_runs_as_measured(readings, expected):
    assert events(guard(), readings) == expected


def test_the_lines_name_the_mode_the_step_the_figures_and_the_fix():
    watcher = guard("dino.center_momentum=0.9")
    lines = [watcher.observe(step, entropy, kl) for step, entropy, kl in CENTER_09[:5]]
    line = lines[4].line
    assert line.startswith("guard: uniform collapse at step 30: teacher entropy 6.868 (ln K = 6.93), "
                           "teacher-student KL 0.0319, for 12 steps; ")
    assert "dino.center_momentum 0.9: uniform by step 40" in line and "this run: dino.center_momentum=0.9" in line
    demo = guard()
    recoveries = [event.line for step, entropy, kl in DEMO
                  if (event := demo.observe(step, entropy, kl)) is not None and not event.mode]
    assert recoveries == ["guard: recovered from the one-hot collapse at step 130: teacher entropy 1.058 "
                          "(ln K = 6.93), teacher-student KL 0.2030"]


@pytest.mark.parametrize("mode, settings, fix", [
    ("uniform", ["dino.center_momentum=0.9"], "dino.center_momentum=0.99"),
    ("uniform", ["dino.center_momentum=0.99"], "optim.lr=0.00025"),
    ("one_hot", ["dino.teacher_temp=0.02"], "dino.teacher_temp=0.04"),
    ("one_hot", ["dino.center_momentum=0.99"], "dino.center_momentum=0.98"),
    ("drift", ["dino.teacher_temp=0.07", "dino.center_momentum=0.99"], "dino.teacher_temp=0.04"),
    ("drift", ["dino.center_momentum=0.99"], "optim.lr=0.00025"),
])
def test_the_stop_lines_example_changes_a_setting_the_warning_names(mode, settings, fix):
    watcher = guard(*settings)
    watcher.mode = mode
    assert watcher.example_fix() == fix and fix.split("=")[0] in HINTS[mode]


def test_state_survives_a_round_trip_mid_collapse(tmp_path):
    """A guard rebuilt from its state between two readings of a collapse reports what an uninterrupted one does,
    and the state is plain data that the checkpoint's data-only loader reads."""
    straight = events(guard(), TEMP_07)
    first = guard()
    before = events(first, TEMP_07[:13])  # stops at the drift's first reading (step 78), 12 steps before its report
    torch.save(first.state_dict(), tmp_path / "guard.pt")
    second = guard()
    second.load_state_dict(checkpoint.load(tmp_path / "guard.pt"))
    assert before + events(second, TEMP_07[13:]) == straight


# ------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train, _ = materialize_demo_dataset(tmp_path_factory.mktemp("digits"), image_size=32)
    return train


DEMO_RECIPE = REPO / "configs" / "demo.yaml"


def demo_arguments(digits, output_dir, *extra) -> list[str]:
    """configs/demo.yaml on 1 block and 2 local crops (the same schedules, ~4x less work per step)."""
    return [f"data.path={digits}", f"output_dir={output_dir}", "data.num_workers=0", "device=cpu", "model.depth=1",
            "data.local_crops_number=2", "eval.final_knn=false", "eval.attention_images=0", *extra]


def demo_config(digits, output_dir, *extra):
    return load_config(DEMO_RECIPE, demo_arguments(digits, output_dir, *extra))


COLLAPSING = ("dino.center_momentum=0.9", "log_every=1", "monitor_every=2", "guard.action=stop")


@pytest.fixture(scope="module")
def collapsed(digits, tmp_path_factory):
    """The demo with the paper's center momentum 0.9 and guard.action=stop: (run folder, trainer, the stop)."""
    run = tmp_path_factory.mktemp("collapsed")
    trainer = Trainer(demo_config(digits, run, *COLLAPSING))
    with pytest.raises(GuardStop) as stop:
        trainer.train(stop_after_steps=40)  # uniform from step ~18, reported ~10 steps later
    return run, trainer, stop.value


def copy_run(collapsed, tmp_path) -> Path:
    return Path(shutil.copytree(collapsed[0], tmp_path / "run"))


def test_a_run_collapsing_to_uniform_stops_with_a_checkpoint_and_one_line(collapsed):
    run, trainer, stop = collapsed
    assert trainer.guard.mode == "uniform" and trainer.step < 40
    assert trainer.last_checkpoint == run / "checkpoint.pth"
    stored = checkpoint.load(run / "checkpoint.pth")
    assert stored["step"] == trainer.step and stored["guard"] == trainer.guard.state_dict()
    assert "\n" not in str(stop)
    assert str(stop).startswith(f"the collapse guard stopped the run at step {trainer.step} (uniform collapse, "
                                f"guard.action=stop) after writing {run / 'checkpoint.pth'}. ")
    assert ("the fixes the warning names included: to try one, rerun with resume=false and e.g. "
            "dino.center_momentum=0.99") in str(stop)


def test_the_command_ends_with_the_line_and_exit_code_3(collapsed, tmp_path, capsys):
    """Resumed from the checkpoint of step 18, before the collapse had held, the command reaches the same stop."""
    first_run, stopped, stop = collapsed
    run = copy_run(collapsed, tmp_path)
    shutil.copy(run / "checkpoint0000.pth", run / "checkpoint.pth")
    capsys.readouterr()
    code = train.main(["--config", str(DEMO_RECIPE), *demo_arguments(stopped.config.data.path, run, *COLLAPSING)])
    assert code == EXIT_GUARD_STOP == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == str(stop).replace(str(first_run), str(run))


def test_the_same_command_continues_the_stopped_run(collapsed, tmp_path):
    """The guard's state comes back with the run: it does not stop again for the collapse it stopped at."""
    _, stopped, _ = collapsed
    run = copy_run(collapsed, tmp_path)
    again = Trainer(demo_config(stopped.config.data.path, run, *COLLAPSING))
    assert again.step == stopped.step and again.guard.state_dict() == stopped.guard.state_dict()
    again.train(stop_after_steps=stopped.step + 4)
    assert again.step == stopped.step + 4 and again.guard.mode == "uniform"


def test_the_advised_fix_starts_over_and_a_resume_with_it_is_refused(collapsed, tmp_path):
    _, stopped, _ = collapsed
    run = copy_run(collapsed, tmp_path)
    fix = stopped.guard.example_fix()
    assert fix == "dino.center_momentum=0.99"
    with pytest.raises(RunChangedError, match="dino.center_momentum"):  # what the line says: a resume refuses it
        Trainer(demo_config(stopped.config.data.path, run, *COLLAPSING, fix))
    fresh = Trainer(demo_config(stopped.config.data.path, run, *COLLAPSING, fix, "resume=false"))
    assert fresh.step == 0 and fresh.guard.mode == "" and fresh.dino_loss.center_momentum == 0.99
    assert list(run.glob("replaced-*/checkpoint.pth"))


def test_a_checkpoint_from_before_the_guard_resumes_with_a_fresh_guard(collapsed, tmp_path):
    _, stopped, _ = collapsed
    run = copy_run(collapsed, tmp_path)
    state = checkpoint.load(run / "checkpoint.pth")
    del state["guard"]
    torch.save(state, run / "checkpoint.pth")
    resumed = Trainer(demo_config(stopped.config.data.path, run, *COLLAPSING))
    assert resumed.step == stopped.step and resumed.guard.state_dict() == Guard(resumed.config).state_dict()


def test_the_sharded_checkpoint_keeps_the_guard_state(collapsed, tmp_path):
    _, stopped, _ = collapsed
    path = tmp_path / sharded_checkpoint.SHARDED_DIR
    sharded_checkpoint.save_sharded(stopped.state_dict(), path, DistributedContext.single())
    template = stopped.state_dict()
    template["guard"] = Guard(stopped.config).state_dict()
    assert sharded_checkpoint.load_sharded(path, template)["guard"] == stopped.guard.state_dict()


def test_monitors_are_only_in_the_rows_that_measured_them(collapsed):
    """log_every=1, monitor_every=2: measured on steps 2, 4, 6... and written in those rows only, in log.jsonl and
    in TensorBoard; the entropy panel shows ln K."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, trainer, _ = collapsed
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, trainer.step + 1))
    measured = [row["step"] for row in rows if "teacher_entropy" in row]
    assert measured == list(range(2, trainer.step + 1, 2))
    assert measured == [row["step"] for row in rows if "teacher_student_kl" in row]
    events_file = EventAccumulator(str(run / "tensorboard"))
    events_file.Reload()
    for key in ("teacher_entropy", "teacher_student_kl"):
        assert [event.step for event in events_file.Scalars(key)] == measured
    figure = training_curves_figure(rows, out_dim=1024)
    entropy_axis = next(axis for axis in figure.axes if axis.get_ylabel() == "teacher entropy")
    assert any(list(line.get_ydata()) == [LN_K, LN_K] for line in entropy_axis.lines)
    assert entropy_axis.get_ylim()[0] == 0
    plt.close(figure)


def test_the_demo_over_sharpens_recovers_and_the_guard_says_so_without_stopping(digits, tmp_path, caplog):
    """The demo's own run, shortened to 4 epochs (72 steps): near 0 from step ~40 to ~64, then back up."""
    config = demo_config(digits, tmp_path, "optim.epochs=4", "log_every=2", "monitor_every=2", "guard.patience=4")
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        Trainer(config).train()
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("guard: ")]
    assert [line.split(" at step")[0] for line in lines] == ["guard: one-hot collapse",
                                                             "guard: recovered from the one-hot collapse"], lines
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == 72


def _guard_of_one_rank(ctx, work, data):
    """One process of the two-rank run below: writes the guard state it ends with."""
    trainer = Trainer(tiny_config(data, work / "run", "monitor_every=1"), ctx)
    trainer.train(stop_after_steps=4)
    (work / f"guard{ctx.rank}.json").write_text(json.dumps(trainer.guard.state_dict()))


def test_every_rank_reads_the_same_figures(tmp_path):
    """The monitors are averaged over the processes (each sees other images), so every rank's guard agrees and
    guard.action=stop ends all of them at the same step."""
    run_on_two_ranks(_guard_of_one_rank, tmp_path, write_image_folder(tmp_path / "images"))
    states = [json.loads((tmp_path / f"guard{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1] and states[0]["lowest"] < math.inf


# --------------------------------------------------------------------------------------- the final kNN
def test_a_final_knn_below_random_init_is_a_warning_with_the_likely_cause(tmp_path, monkeypatch, caplog):
    images = write_image_folder(tmp_path / "images")
    config = tiny_config(images, tmp_path / "run", "eval.final_knn=true", f"eval.knn_train_path={images}",
                         f"eval.knn_val_path={images}", "eval.image_size=16", "model.out_dim=1024")
    (tmp_path / "run").mkdir()
    rows = [{"step": step, "loss": 6.9, "teacher_entropy": entropy, "teacher_student_kl": kl}
            for step, entropy, kl in CENTER_09]
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures = iter([41.0, 50.0])
    monkeypatch.setattr(report, "knn_top1", lambda *args: next(figures))
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        report.final_report(config, torch.nn.Identity(), torch.device("cpu"), 144)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("training made the features worse: kNN top-1 41.00% against 50.00% at random "
                                  "init; likely cause: the teacher output ends in uniform collapse (teacher "
                                  "entropy 6.930 of ln K = 6.93 at step 144")
    assert "dino.center_momentum 0.9" in warnings[0]
    assert "without a collapse" in report.below_random_init(config, {"knn_top1_trained": 41.0,
                                                              "knn_top1_random_init": 50.0}, rows[:2])
    figures = iter([55.0, 50.0])
    caplog.clear()
    report.final_report(config, torch.nn.Identity(), torch.device("cpu"), 144)
    assert not [record for record in caplog.records if record.levelno == logging.WARNING]


def test_replay_reaches_the_runs_own_conclusion():
    rows = [{"step": step, "teacher_entropy": entropy, "teacher_student_kl": kl} for step, entropy, kl in TEMP_07]
    live = guard()
    events(live, TEMP_07)
    assert replay(live.config, rows).state_dict() == live.state_dict()
