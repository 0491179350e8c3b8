"""SIGKILL at random moments, some inside checkpoint writes, then the same command again until it finishes: the
result equals an uninterrupted run bit for bit, every announced numbered copy exists and loads, each step is
logged once, no temporary file outlives the next start, and the user's files in the run folder (a git checkout
with look-alike names) are untouched."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import LOOK_ALIKES, assert_user_files_intact, plant_user_files, write_image_folder

from fastdino import checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 4, 8  # 32 images, batch 4


def command(images: Path, output_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), f"data.path={images}", f"output_dir={output_dir}",
            "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.out_dim=64",
            "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "data.global_crop_size=16",
            "data.local_crop_size=8", "data.local_crops_number=2", "data.batch_size_per_gpu=4",
            "data.num_workers=0", f"optim.epochs={EPOCHS}", "optim.warmup_epochs=1", "log_every=1",
            "monitor_every=2", "checkpoint_every=3", "saveckp_freq=1", "device=cpu"]


def rows(output_dir: Path) -> list[str]:
    path = output_dir / "log.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def temporaries(output_dir: Path) -> set[str]:
    """What the run's writers have in progress (the user's look-alike names excluded)."""
    if not output_dir.is_dir():
        return set()
    planted = {Path(name).parts[0] for name in LOOK_ALIKES}
    return {path.name for path in output_dir.iterdir() if path.name not in planted and (
        checkpoint.TEMPORARY_MARK in path.name or path.name.endswith(".tmp"))}


def run_until_killed(arguments: list[str], output_dir: Path, inside_write: bool, rng: random.Random) -> int:
    """Start the command and SIGKILL it: while the first, second or third file it writes is being written (a
    checkpoint, its numbered copy, the log), or a few log rows in."""
    process = subprocess.Popen(arguments, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, target, seen = len(rows(output_dir)), rng.randint(1, 5), set()
    while process.poll() is None:
        seen |= temporaries(output_dir) if inside_write else set()
        if inside_write and len(seen) >= target % 3 + 1:
            break
        if not inside_write and len(rows(output_dir)) >= start + target:
            time.sleep(rng.uniform(0, 0.05))
            break
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode in (0, -signal.SIGKILL), stderr
    return process.returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    images = write_image_folder(root / "images", count=32)
    straight = root / "straight"
    subprocess.run(command(images, straight), cwd=REPO, check=True, capture_output=True)
    killed, rng = root / "killed", random.Random(0)
    killed.mkdir()
    planted = plant_user_files(killed)
    kills = writes_cut = 0
    left_behind: set[str] = set()
    while True:
        inside_write = kills % 2 == 1
        code = run_until_killed(command(images, killed), killed, inside_write, rng) if kills < 12 else None
        if code is None:  # enough kills: finish the run
            subprocess.run(command(images, killed), cwd=REPO, check=True, capture_output=True)
            break
        if code == 0:
            break
        kills += 1
        cut = temporaries(killed)
        writes_cut += bool(cut)
        left_behind |= cut
    return straight, killed, kills, writes_cut, left_behind, planted


def test_kills_happened_and_some_cut_a_checkpoint_write(runs):
    _, _, kills, writes_cut, left_behind, _ = runs
    assert kills >= 6 and writes_cut >= 2, (kills, writes_cut)
    assert left_behind  # the killed writers did leave temporary files ...


def test_no_temporary_file_survives_the_next_start(runs):
    _, killed, _, _, left_behind, _ = runs
    assert not temporaries(killed) and not (left_behind & {path.name for path in killed.iterdir()})


def test_the_users_files_in_the_run_folder_survive_every_kill(runs):
    _, killed, *_, planted = runs
    assert_user_files_intact(killed, planted)


def test_final_state_is_bit_identical_to_an_uninterrupted_run(runs):
    straight, killed, *_ = runs
    a, b = checkpoint.load(straight / checkpoint.LATEST), checkpoint.load(killed / checkpoint.LATEST)
    assert a["step"] == b["step"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    for index, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[name], b["optimizer"]["state"][index][name]) for name in state)


def test_every_numbered_copy_exists_loads_and_matches(runs):
    straight, killed, *_ = runs
    for epoch in range(EPOCHS):
        name = f"checkpoint{epoch:04d}.pth"
        a, b = checkpoint.load(straight / name), checkpoint.load(killed / name)
        assert a["step"] == b["step"] == (epoch + 1) * STEPS_PER_EPOCH
        assert all(torch.equal(a["teacher"][key], b["teacher"][key]) for key in a["teacher"])


def test_each_step_is_logged_once_with_the_same_losses(runs):
    straight, killed, *_ = runs

    def numbers(output_dir):
        return [{key: value for key, value in json.loads(line).items() if key != "img_per_s"}
                for line in rows(output_dir)]

    steps = [row["step"] for row in numbers(killed)]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert numbers(killed) == numbers(straight)


def test_tensorboard_shows_each_step_once(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, killed, *_ = runs
    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("loss")]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
