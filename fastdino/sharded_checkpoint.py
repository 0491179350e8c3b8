"""Sharded checkpoints (torch.distributed.checkpoint) for FSDP runs, and the consolidated teacher export.

A sharded checkpoint is a directory `<output_dir>/checkpoint_dcp/`: every rank writes its own shards of the
student, teacher and optimizer state (no gather onto one rank), rank 0 adds `plain.pt` with the per-rank RNG states
and the config. It is written into `.checkpoint_dcp.tmp/` and published by renaming, so a process killed at any
moment leaves the previous checkpoint loadable:

    write .checkpoint_dcp.tmp/  ->  checkpoint_dcp/ -> .checkpoint_dcp.old/  ->  .tmp -> checkpoint_dcp/  ->  drop .old

Between the two renames only `.checkpoint_dcp.old/` exists; `find_sharded_checkpoint` falls back to it. On several
nodes the output directory must be on a filesystem all ranks see.

A sharded checkpoint loads at any world size, also into a single process (DCP reshards on load).
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from fastdino import checkpoint
from fastdino.hub import backbone_state_dict
from fastdino.distributed import DistributedContext, full_state_dict

SHARDED_DIR = "checkpoint_dcp"
PLAIN_FILE = "plain.pt"
PLAIN_KEYS = ("rng", "config")  # per-rank and nested plain data: written by rank 0 with torch.save, not DCP
EXPORT_FILE = "teacher_export.pth"


def _staging_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def _is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / PLAIN_FILE).is_file()


def save_sharded(state: dict[str, Any], path: str | Path, ctx: DistributedContext) -> None:
    """Write a training state (DTensors, plain tensors, numbers) as a sharded checkpoint at directory `path`.

    Collective: every rank calls it with its own state; entries named in PLAIN_KEYS are taken from rank 0.
    """
    path = Path(path)
    tmp, old = _staging_paths(path)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    ctx.barrier()
    sharded = {key: value for key, value in state.items() if key not in PLAIN_KEYS}
    with _single_process_quiet():
        dcp.save(sharded, checkpoint_id=tmp, no_dist=not ctx.initialized)
    if ctx.is_main:
        checkpoint.save_atomic({key: state[key] for key in PLAIN_KEYS if key in state}, tmp / PLAIN_FILE)
        _publish(tmp, path, old)
    ctx.barrier()


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; a single process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _publish(tmp: Path, path: Path, old: Path) -> None:
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable (a power loss after return keeps them)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def find_sharded_checkpoint(path: str | Path) -> Path | None:
    """The complete sharded checkpoint at `path`, or its predecessor if a save was cut between its renames."""
    path = Path(path)
    for candidate in (path, _staging_paths(path)[1]):
        if _is_complete(candidate):
            return candidate
    return None


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """What a run in `output_dir` continues from: `checkpoint.pth` (single process, DDP) or `checkpoint_dcp/`
    (FSDP), the more recent if both exist (a run that changed strategy)."""
    candidates = [checkpoint.latest_checkpoint(output_dir), find_sharded_checkpoint(Path(output_dir) / SHARDED_DIR)]
    candidates = [path for path in candidates if path is not None]
    if not candidates:
        return None

    def written_at(path: Path) -> float:
        return (path / PLAIN_FILE).stat().st_mtime if path.is_dir() else path.stat().st_mtime

    return max(candidates, key=written_at)


def load_sharded(path: str | Path, template: dict[str, Any]) -> dict[str, Any]:
    """Read a sharded checkpoint into `template` (this rank's current training state, whose tensors give the
    sharding to load into; filled in place). Returns the template with the PLAIN_KEYS entries added."""
    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no .metadata or {PLAIN_FILE})")
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata.keys()
    sharded = _present_only({key: value for key, value in template.items() if key not in PLAIN_KEYS},
                            _with_prefixes(stored))
    with _single_process_quiet():
        dcp.load(sharded, checkpoint_id=path, no_dist=not (dist.is_available() and dist.is_initialized()))
    return {**sharded, **checkpoint.load(path / PLAIN_FILE)}


def _with_prefixes(names: Any) -> set[str]:
    """Stored (flattened, dotted) names and every dotted prefix of them."""
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return found


def _present_only(template: dict[str, Any], stored: set[str], prefix: str = "") -> dict[str, Any]:
    """The template without the entries the checkpoint does not hold, e.g. optimizer moments of a parameter that had
    no gradient yet when it was saved (the frozen last layer): they must stay absent, not be loaded as zeros."""
    kept = {}
    for key, value in template.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            inner = _present_only(value, stored, f"{path}.")
            if inner:
                kept[key] = inner
        elif path in stored or isinstance(value, dict):  # an empty dict has nothing to load
            kept[key] = value
    return kept


def keep_copy(path: str | Path, destination: str | Path) -> None:
    """Copy a published sharded checkpoint to `destination` (e.g. checkpoint0019_dcp), atomically (rank 0 only)."""
    destination = Path(destination)
    tmp, _ = _staging_paths(destination)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    shutil.rmtree(destination, ignore_errors=True)
    os.rename(tmp, destination)


def export_teacher(trainer, path: str | Path | None = None, include_head: bool = False) -> Path:
    """Write the teacher's weights as one plain state dict for downstream use, whatever the strategy.

    include_head=False: backbone keys as the reference's released weights (`cls_token`, `blocks.0.attn.qkv.weight`,
    ...): `fastdino.models.vit_*(...).load_state_dict(torch.load(path))` accepts it. include_head=True: the
    reference checkpoint's teacher layout (`backbone.*` and `head.*`), loadable into a MultiCropWrapper.
    Collective under FSDP (every rank calls it; rank 0 writes). Returns the path.
    """
    path = Path(path) if path is not None else trainer.output_dir / EXPORT_FILE
    weights = full_state_dict(trainer.teacher)
    if trainer.ctx.is_main:
        if not include_head:
            weights = backbone_state_dict(weights)
        checkpoint.save_atomic(weights, path)
    trainer.ctx.barrier()
    return path
