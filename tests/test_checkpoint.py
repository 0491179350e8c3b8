"""Atomic checkpoints: a process killed while writing leaves the previous checkpoint intact and loadable."""
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from fastdino import checkpoint

WRITER = """
import sys, torch
from fastdino.checkpoint import save_atomic
big = {"weights": torch.randn(64, 1024, 1024), "step": 2}
print("ready", flush=True)
save_atomic(big, sys.argv[1])
"""


def test_kill_during_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    previous = {"weights": torch.arange(10.0), "step": 1}
    checkpoint.save_atomic(previous, path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint.pth.tmp-*")) and time.time() < deadline:
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert list(tmp_path.glob(".checkpoint.pth.tmp-*")), "the writer never started writing"
    loaded = checkpoint.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], previous["weights"])


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = checkpoint.capture_rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    checkpoint.save_atomic({"rng": state}, tmp_path / "c.pth")
    random.random(), np.random.rand(), torch.rand(5)
    checkpoint.restore_rng_state(checkpoint.load(tmp_path / "c.pth")["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_latest_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None
    checkpoint.save_atomic({"step": 0}, tmp_path / checkpoint.LATEST)
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / checkpoint.LATEST
