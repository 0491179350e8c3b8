"""The output folder of a run: which of its entries are the run's own, what a killed run left (tidied up), a run that
is to start over (its own entries moved aside, never deleted), and the record of what ran.

A run folder may also hold the user's files (notes, or a whole project when output_dir points into one). A run moves,
renames or deletes only what it can prove is its own: the names below, and the temporaries its writers make of them
by their exact pattern. A folder where one of those names exists without a run that wrote it (no checkpoint, no
`run_info.json`) is refused, so that a user's own `config.yaml` or `log.jsonl` is never overwritten or moved.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from fastdino import checkpoint, sharded_checkpoint
from fastdino.config import Config, config_to_dict
from fastdino.errors import UsageError

log = logging.getLogger("fastdino")

# The entries a run writes at the top of its folder.
METRICS_LOG = "log.jsonl"
TENSORBOARD = "tensorboard"
RESOLVED_CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
RUN_LOG = "train.log"
RESULTS = "results.json"
CURVES = "training_curves.png"
PICTURES = "attention"
OWN_NAMES = re.compile(r"checkpoint(\d{4,})?(\.pth|_dcp)|" + "|".join(
    re.escape(name) for name in (METRICS_LOG, TENSORBOARD, RESOLVED_CONFIG, RUN_INFO, RUN_LOG, RESULTS, CURVES,
                                 PICTURES)))
REPLACED_PREFIX = "replaced-"  # earlier runs moved aside: kept where they are
WRITTEN_BY = "fastdino"  # RUN_INFO's `written_by`: the proof that a fastdino run owns the folder


class ForeignFolderError(UsageError):
    """output_dir holds entries with a run's names that no fastdino run wrote."""


def is_own(name: str) -> bool:
    """Whether an entry called `name` at the top of a run folder is one a run writes."""
    return OWN_NAMES.fullmatch(name) is not None


def is_own_leftover(name: str) -> bool:
    """Whether `name` is a temporary that one of the run's writers made of one of its own entries."""
    for pattern in (checkpoint.TEMPORARY_NAME, sharded_checkpoint.STAGING_NAME):
        match = pattern.fullmatch(name)
        if match is not None and is_own(match.group("target")):
            return True
    return False


def holds_run(output_dir: Path) -> bool:
    """A fastdino run wrote into `output_dir`: it holds a checkpoint, or the run record says so."""
    if sharded_checkpoint.find_resume_checkpoint(output_dir) is not None:
        return True
    try:
        return json.loads((output_dir / RUN_INFO).read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def check_usable(output_dir: str | Path) -> None:
    """ForeignFolderError when `output_dir` holds a run's names (config.yaml, log.jsonl, ...) but no run: a run there
    would overwrite or move files it did not write. Any other folder is fine (missing, empty, a run, other files)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ForeignFolderError(f"output_dir={output_dir} is a file, not a folder; pass another output_dir=...")
    if not output_dir.is_dir():
        return
    named = sorted(entry.name for entry in output_dir.iterdir() if is_own(entry.name))
    if named and not holds_run(output_dir):
        raise ForeignFolderError(
            f"output_dir={output_dir} holds {', '.join(named)}, which a run writes, but no fastdino run (no "
            f"checkpoint, no {RUN_INFO}): they are not touched; pass another output_dir=..., or move them away")


def own_entries(output_dir: Path) -> list[Path]:
    """The run's own entries in `output_dir`, earlier moved-aside runs excluded."""
    return sorted(entry for entry in output_dir.iterdir() if is_own(entry.name))


def prepare(output_dir: Path, start_over: bool) -> None:
    """Rank 0, before any rank looks for a checkpoint: refuse a folder holding a run's names but no run, finish a
    sharded save cut between its renames, remove the temporaries of writes a kill interrupted, with `start_over`
    move the previous run's own entries into a subfolder; then claim the folder (RUN_INFO) and hold the log's lines
    for RUN_LOG."""
    check_usable(output_dir)
    sharded_checkpoint.finish_interrupted_publish(output_dir / sharded_checkpoint.SHARDED_DIR)
    remove_leftover_temporaries(output_dir)
    moved = move_aside(output_dir) if start_over else None
    if not holds_run(output_dir):  # claim the folder before anything else is written into it
        write_run_info(output_dir, {"started_from": "starting"})
    hold_log_lines()
    if moved is not None:
        log.info("resume=false: the previous run in %s was moved to %s; starting over", output_dir, moved)
    others = sorted(entry.name for entry in output_dir.iterdir()
                    if not is_own(entry.name) and not entry.name.startswith(REPLACED_PREFIX))
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        log.info("%s also holds %d entr%s that this run leaves untouched: %s", output_dir, len(others),
                 "y" if len(others) == 1 else "ies", listed)


def remove_leftover_temporaries(output_dir: Path) -> list[Path]:
    """Delete the temporaries killed writers left of the run's own entries (only when no other process writes there).
    Returns what was removed."""
    removed = []
    for entry in sorted(output_dir.iterdir()):
        if is_own_leftover(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def move_aside(output_dir: Path) -> Path | None:
    """Move the run's own entries into `replaced-<date>/`; None if there are none (nothing else is moved)."""
    entries = own_entries(output_dir)
    if not entries:
        return None
    destination = output_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    destination.mkdir()
    for entry in entries:
        entry.rename(destination / entry.name)
    return destination


def write_resolved_config(output_dir: Path, config: Config) -> Path:
    """Every setting the run uses (defaults, the --config file and the overrides, `auto` kept as written so that the
    file reruns anywhere) as `config.yaml`: a file `--config` takes to run it again. What `auto` chose on this
    machine is in RUN_INFO."""
    plain = json.loads(json.dumps(config_to_dict(config)))  # tuples as lists, for YAML
    path = output_dir / RESOLVED_CONFIG
    checkpoint.write_text_atomic(yaml.safe_dump(plain, sort_keys=False), path)
    return path


def write_run_info(output_dir: Path, info: dict[str, Any]) -> Path:
    """RUN_INFO: what this start of the run resolved and found (`info`), marked as written by fastdino."""
    path = output_dir / RUN_INFO
    checkpoint.write_text_atomic(json.dumps({"written_by": WRITTEN_BY, **info}, indent=1) + "\n", path)
    return path


_run_log: logging.Handler | None = None  # one run log per process: a later run's replaces an earlier one's


def hold_log_lines() -> None:
    """Keep the "fastdino" log's lines from now on for RUN_LOG, written once the run is accepted: a run refused while
    starting (other settings, an untrusted checkpoint) leaves its folder as it was."""
    _use_run_log(logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))


def log_to_run_folder(output_dir: Path) -> None:
    """From now on, the "fastdino" log also goes to RUN_LOG in the run folder (appended), the lines held since
    `hold_log_lines` first."""
    run_log = logging.FileHandler(output_dir / RUN_LOG)
    run_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if isinstance(_run_log, logging.handlers.MemoryHandler):
        _run_log.setTarget(run_log)
        _run_log.flush()
    _use_run_log(run_log)


def _use_run_log(handler: logging.Handler) -> None:
    global _run_log
    logger = logging.getLogger("fastdino")
    if _run_log is not None:
        logger.removeHandler(_run_log)
        _run_log.close()
    _run_log = handler
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:  # the start-up block and the notes are INFO lines
        logger.setLevel(logging.INFO)
