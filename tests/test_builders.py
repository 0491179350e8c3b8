"""What a run says about itself at start: one block with device, precision, strategy and every fast path with why
it is on or off, and the resolved config written to the run folder (a file `--config` takes back unchanged)."""
import logging
import re

from helpers import tiny_config, write_image_folder

from fastdino.config import config_to_dict, load_config
from fastdino.run_folder import RESOLVED_CONFIG
from fastdino.trainer import Trainer


def test_start_says_what_runs_and_why(tmp_path, caplog):
    images = write_image_folder(tmp_path / "images", count=8)
    with caplog.at_level(logging.INFO, logger="fastdino"):
        Trainer(tiny_config(images, tmp_path / "run", "fast.fused_ema=false", "fast.sync_free_clip=true"))
    lines = [record.getMessage() for record in caplog.records]
    head = next(index for index, line in enumerate(lines) if line.startswith("running on "))
    assert re.fullmatch(r"running on cpu-\w+, [\d.]+ GiB, precision fp32, strategy none over 1 process", lines[head])
    assert lines[head + 2] == "4 images a process as 1 micro-batch, 0 blocks recomputed (as set)"
    assert lines[head + 3] == "attention: one forward per crop size, math attention; fast paths:"
    block = dict(line.strip().split(": ", 1) for line in lines[head + 4: head + 12])
    assert block == {
        "fused_loss": "off (auto: needs CUDA)", "fused_ema": "off (set to false)",
        "packed": "off (auto: needs CUDA with xformers or varlen flash attention)",
        "efficient_drop_path": "off (auto: needs CUDA)", "fused_adamw": "off (auto: needs CUDA)",
        "sync_free_clip": "on (set to true)", "compile": "off (set to false)", "data.loader": "torch (auto: no CUDA)"}


def test_the_resolved_config_is_written_and_reads_back(tmp_path):
    images = write_image_folder(tmp_path / "images", count=8)
    config = tiny_config(images, tmp_path / "run", "optim.lr=0.003", "data.local_crops_scale=[0.1, 0.3]")
    Trainer(config)
    again = load_config(tmp_path / "run" / RESOLVED_CONFIG)
    assert config_to_dict(again) == config_to_dict(config)
