"""Sharded checkpoints (torch.distributed.checkpoint) for FSDP runs, and the consolidated teacher export.

A sharded checkpoint is a directory `<output_dir>/checkpoint_dcp/`: every rank writes its own shards of the
student, teacher and optimizer state (no gather onto one rank), rank 0 adds `plain.pt` with the per-rank RNG states
and the config. It is written into `.checkpoint_dcp.tmp/` and published by renaming, so a process killed at any
moment leaves the previous checkpoint loadable:

    write .checkpoint_dcp.tmp/  ->  checkpoint_dcp/ -> .checkpoint_dcp.old/  ->  .tmp -> checkpoint_dcp/  ->  drop .old

Between the two renames only `.checkpoint_dcp.old/` exists; `find_sharded_checkpoint` falls back to it. On several
nodes the output directory must be on a filesystem all ranks see.

A sharded checkpoint loads at any world size, also into a single process (DCP reshards on load).

Reading is data only, as for plain checkpoints: DCP's `.metadata` is a pickle, and its loader unpickles it and every
non-tensor entry without restriction. Here `.metadata` goes through an unpickler that builds only DCP's own metadata
classes and the torch types they hold, tensors through `torch.load(weights_only=True)`, and non-tensor entries are
checked by the same restricted loader before DCP reads them. Anything else is refused with the file named.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from fastdino import checkpoint
from fastdino.distributed import DistributedContext

SHARDED_DIR = "checkpoint_dcp"
PLAIN_FILE = "plain.pt"
PLAIN_KEYS = ("rng", "config")  # per-rank and nested plain data: written by rank 0 with torch.save, not DCP


STAGING_NAME = re.compile(r"\.(?P<target>.+)\.(tmp|old)")  # the names _staging_paths makes


def _staging_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def _is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / PLAIN_FILE).is_file()


def save_sharded(state: dict[str, Any], path: str | Path, ctx: DistributedContext,
                 copies: tuple[Path, ...] = ()) -> None:
    """Write a training state (DTensors, plain tensors, numbers) as a sharded checkpoint at directory `path`, and
    the numbered `copies` of it. The copies are made before `path` is replaced, so a kill never leaves a published
    checkpoint whose announced copy is missing (the rerun writes both again).

    Collective: every rank calls it with its own state; entries named in PLAIN_KEYS are taken from rank 0.
    """
    path = Path(path)
    tmp, old = _staging_paths(path)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    ctx.barrier()
    sharded = {key: value for key, value in state.items() if key not in PLAIN_KEYS}
    try:
        with _single_process_quiet():
            dcp.save(sharded, checkpoint_id=tmp, no_dist=not ctx.initialized)
    except dcp.CheckpointException as error:  # a full disk on any rank: its OSError, with errno, for the caller
        raise next((cause for cause in _causes(error) if isinstance(cause, OSError)), error) from None
    if ctx.is_main:
        # last into the folder: its fsync of the folder makes the names of every file DCP wrote there durable too
        checkpoint.save_atomic({key: state[key] for key in PLAIN_KEYS if key in state}, tmp / PLAIN_FILE)
        for copy in copies:
            keep_copy(tmp, copy)
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
    checkpoint.fsync_directory(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_sharded_checkpoint(path: str | Path) -> Path | None:
    """The complete sharded checkpoint at `path`, or its predecessor if a save was cut between its renames."""
    path = Path(path)
    for candidate in (path, _staging_paths(path)[1]):
        if _is_complete(candidate):
            return candidate
    return None


def finish_interrupted_publish(path: str | Path) -> None:
    """A save killed between its two renames leaves only `.<name>.old/`: put it back in place (rank 0, before
    anything reads `path`)."""
    path = Path(path)
    old = _staging_paths(path)[1]
    if _is_complete(old) and not _is_complete(path):
        shutil.rmtree(path, ignore_errors=True)
        os.rename(old, path)
    shutil.rmtree(old, ignore_errors=True)


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
    sharding to load into; filled in place). Returns the template with the PLAIN_KEYS entries added.

    Raises UntrustedCheckpointError (naming the file) if any file holds something other than data."""
    path = _complete(path)
    plain = read_plain(path)
    stored = read_metadata(path).state_dict_metadata.keys()
    sharded = _present_only({key: value for key, value in template.items() if key not in PLAIN_KEYS},
                            _with_prefixes(stored))
    _load_as_data(sharded, path, no_dist=not (dist.is_available() and dist.is_initialized()))
    return {**sharded, **plain}


def _complete(path: str | Path) -> Path:
    path = Path(path)
    if not _is_complete(path):
        inside = [path / name for name in (checkpoint.LATEST, SHARDED_DIR) if (path / name).exists()]
        hint = f"; a run folder? pass {inside[0]}" if inside else ""
        raise checkpoint.CheckpointError(
            f"{path} is not a complete sharded checkpoint (no .metadata or {PLAIN_FILE}){hint}")
    return path


def _load_as_data(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """dcp.load into `state` through the data-only reader and planner; a failure is one CheckpointError."""
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_DataOnlyReader(path), planner=_DataOnlyPlanner(), no_dist=no_dist)
    except dcp.CheckpointException as error:
        raise _first_cause(error, path) from None


def read_plain(path: str | Path) -> dict[str, Any]:
    """The entries rank 0 writes beside the shards (PLAIN_KEYS: per-rank RNG states, the config)."""
    return checkpoint.load(Path(path) / PLAIN_FILE)


def read_unsharded(path: str | Path, entries: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The training state saved at `path` (all of it, or its top-level `entries`), unsharded in this one process and
    without a training state to load into: nested as a one-process `Trainer.state_dict()` holds it (optimizer state
    and groups by parameter name), with the plain entries when all is read. Read as data like every checkpoint."""
    path = _complete(path)
    metadata = read_metadata(path)
    paths = metadata.planner_data  # DCP's record of how it flattened the nested state: name -> (key, key, index, ...)
    flat = {name: torch.empty(entry.size, dtype=entry.properties.dtype) if hasattr(entry, "size") else None
            for name, entry in metadata.state_dict_metadata.items()
            if entries is None or paths[name][0] in entries}  # None: a non-tensor entry, filled in by the load
    _load_as_data(flat, path, no_dist=True)
    nested: dict[Any, Any] = {}
    for name, value in flat.items():
        *parents, leaf = paths[name]
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    state = _lists_restored(nested)
    return state if entries is not None else {**state, **read_plain(path)}


def _lists_restored(node: Any) -> Any:
    """DCP flattens a list (the optimizer's param_groups) by index: a dict whose keys are all ints was a list."""
    if not isinstance(node, dict):
        return node
    node = {key: _lists_restored(value) for key, value in node.items()}
    return [node[index] for index in range(len(node))] if node and all(isinstance(key, int) for key in node) else node


def _causes(error: dcp.CheckpointException) -> list[BaseException]:
    """DCP wraps every rank's failure with its traceback; the exceptions themselves."""
    return [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]


def _first_cause(error: dcp.CheckpointException, path: Path) -> checkpoint.CheckpointError:
    """The first rank's failure, as one line."""
    causes = _causes(error)
    for cause in causes:
        if isinstance(cause, checkpoint.CheckpointError):
            return cause
    first = causes[0] if causes else error
    return checkpoint.CheckpointError(f"{path} could not be read: {type(first).__name__}: {first}")


# The modules whose classes a DCP `.metadata` file may name (checked before anything is imported or built).
_METADATA_PACKAGE = "torch.distributed.checkpoint."
_PATH_CLASSES = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
                 ("pathlib._local", "PurePosixPath")}
_TORCH_CALLABLES = {("torch", "Size"), ("torch.serialization", "_get_layout")}


def _metadata_global(module: str, name: str) -> Any | None:
    """The object a `.metadata` pickle may name, or None: DCP's own metadata classes (dataclasses and enums of
    torch.distributed.checkpoint), torch dtypes, torch.Size, layouts, and the path of the checkpoint."""
    if (module, name) in _PATH_CLASSES | _TORCH_CALLABLES:
        return getattr(importlib.import_module(module), name)
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, torch.dtype) else None
    if module.startswith(_METADATA_PACKAGE):
        value = getattr(importlib.import_module(module), name, None)
        is_record = isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
        return value if is_record else None
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused before it is imported."""

    def __init__(self, handle: io.BufferedReader, source: Path) -> None:
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = _metadata_global(module, name)
        if found is None:
            raise checkpoint.untrusted(self.source, f"a pickled object of type {module}.{name}")
        return found


def read_metadata(path: str | Path) -> Metadata:
    """The `.metadata` of a sharded checkpoint, read with the allow-listed unpickler."""
    source = Path(path) / ".metadata"
    try:
        with open(source, "rb") as handle:
            metadata = _MetadataUnpickler(handle, source).load()
    except checkpoint.CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise checkpoint.CheckpointError(f"{source} is not readable checkpoint metadata ({error})") from None
    if not isinstance(metadata, Metadata):
        raise checkpoint.CheckpointError(f"{source} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class _DataOnlyReader(dcp.FileSystemReader):
    """DCP's file reader with the safe metadata reader, and refusals that name the file they come from."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in by_file.items():
            source = Path(self.path) / relative_path
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except pickle.UnpicklingError as error:  # a tensor entry: DCP's own weights_only load refused it
                raise checkpoint.unpickling_refusal(source, error) from None
            except checkpoint.CheckpointError as error:  # a non-tensor entry, refused by the planner below
                error.args = (f"in {source}: {error}",)
                raise
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(None)
        return done


class _DataOnlyPlanner(dcp.DefaultLoadPlanner):
    """Non-tensor entries (step, optimizer hyper-parameters) are checked with the restricted loader first; only
    bytes it accepted as plain data reach DCP's own (unrestricted) loader."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        checkpoint.load(value, name=f"entry {read_item.dest_index.fqn!r}")
        value.seek(0)
        super().load_bytes(read_item, value)


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
    """Copy a sharded checkpoint folder to `destination` (e.g. checkpoint0019_dcp), atomically (rank 0 only)."""
    destination = Path(destination)
    tmp, _ = _staging_paths(destination)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, copy_function=checkpoint.copy_durably)
    checkpoint.fsync_directory(tmp)
    shutil.rmtree(destination, ignore_errors=True)
    os.rename(tmp, destination)  # made durable by the publish that follows (save_sharded)
