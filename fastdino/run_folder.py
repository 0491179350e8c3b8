"""The output folder of a run, made ready before training starts: what a killed run left is tidied up, and a run
that is to start over is moved aside (never deleted)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from fastdino import checkpoint, sharded_checkpoint
from fastdino.config import Config, config_to_dict

log = logging.getLogger("fastdino")

REPLACED_PREFIX = "replaced-"
RESOLVED_CONFIG = "config.yaml"


def prepare(output_dir: Path, start_over: bool) -> None:
    """Rank 0, before any rank looks for a checkpoint: finish a sharded save cut between its renames, remove the
    temporary files of writes a kill interrupted, and with `start_over` move the previous run into a subfolder."""
    sharded_checkpoint.finish_interrupted_publish(output_dir / sharded_checkpoint.SHARDED_DIR)
    checkpoint.remove_leftover_temporaries(output_dir)
    if start_over:
        moved = move_aside(output_dir)
        if moved is not None:
            log.info("resume=false: the previous run in %s was moved to %s; starting over", output_dir, moved)


def move_aside(output_dir: Path) -> Path | None:
    """Move everything in `output_dir` except earlier moved-aside runs into `replaced-<date>/`; None if empty."""
    entries = [entry for entry in output_dir.iterdir() if not entry.name.startswith(REPLACED_PREFIX)]
    if not entries:
        return None
    destination = output_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    destination.mkdir()
    for entry in entries:
        entry.rename(destination / entry.name)
    return destination



def write_resolved_config(output_dir: Path, config: Config) -> Path:
    """Every setting the run uses (defaults, the --config file and the overrides resolved) as `config.yaml` in the
    run folder: what ran, and a file `--config` takes to run it again."""
    plain = json.loads(json.dumps(config_to_dict(config)))  # tuples as lists, for YAML
    path = output_dir / RESOLVED_CONFIG
    checkpoint.write_text_atomic(yaml.safe_dump(plain, sort_keys=False), path)
    return path
