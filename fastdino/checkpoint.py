"""Checkpoint files: written atomically, read as data only (never as code), plus exact-resume RNG state.

Reading: every file goes through `torch.load(weights_only=True)`, PyTorch's restricted unpickler, which builds only
tensors and plain containers; a file that names any other Python object is refused with one line and nothing in it
runs. Writing: a temporary file beside the target, flushed to disk, then renamed, so a kill at any moment leaves
the previous file or the new one; a failed write (full disk, no permission) is one line that names the file.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from fastdino.errors import UsageError

LATEST = "checkpoint.pth"
TEMPORARY_MARK = ".tmp-"  # in the name of every file being written; leftovers of a killed run carry it
TEMPORARY_NAME = re.compile(rf"\.(?P<target>.+){re.escape(TEMPORARY_MARK)}\d+")  # what temporary_path makes


class CheckpointError(UsageError):
    """A checkpoint that cannot be read, or written; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, no permission); the message says what survives."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file holding something other than tensors and plain data; it was not executed."""


def untrusted(source: str | Path, found: str) -> UntrustedCheckpointError:
    """The refusal of `source`, which holds `found` (e.g. "a pickled object of type posix.system")."""
    return UntrustedCheckpointError(f"refused {source}: it holds {found}, which a checkpoint never needs; nothing in "
                                    "it was executed (fastdino reads checkpoints as data only)")


def unpickling_refusal(source: str | Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The one-line error for a file that PyTorch's restricted unpickler (`weights_only=True`) stopped."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch omits builtins
        return untrusted(source, f"a pickled object of type {name}")
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason_text = reason.group(1).strip() if reason else text.strip().splitlines()[0]
    return CheckpointError(f"{source} is not a readable checkpoint (the safe loader stopped at: {reason_text}); "
                           "nothing in it was executed")


def load(source: str | Path | IO[bytes], map_location: str | torch.device = "cpu",
         allowed_globals: Iterable[Any] = (), name: str | Path | None = None) -> Any:
    """Read a checkpoint file (or stream) as data: tensors, numbers, strings, containers, and `allowed_globals`.

    Raises UntrustedCheckpointError for anything else, CheckpointError for a file that is not a checkpoint.
    """
    name = name or source
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise unpickling_refusal(name, error) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {name}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{name} is not a readable checkpoint ({first_line})") from None


class _WriteErrorKeeper:
    """A file wrapper for torch.save, which turns the file's OSError (full disk) into a RuntimeError without errno:
    the original error is kept so that the caller can name it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def temporary_path(path: Path) -> Path:
    """Where `path` is written before being renamed into place (its name matches TEMPORARY_NAME)."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def save_atomic(state: Any, path: str | Path, serialize: Callable[[Any, IO[bytes]], Any] = torch.save) -> None:
    """Write `state` with `serialize` (torch.save, or another format's writer) to a temporary file beside `path`,
    flush it to disk, then rename, then flush the folder (which holds the name): a crash at any moment leaves either
    the previous file or the new one, never a torn one, and a power loss after return keeps the new one. Raises
    OSError (with its errno) if the write fails; the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            keeper = _WriteErrorKeeper(handle)
            try:
                serialize(state, keeper)
            except RuntimeError:
                if keeper.error is not None:
                    raise keeper.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable (a power loss after return keeps them)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(text: str, path: str | Path) -> None:
    """`save_atomic` for a text file (logs, results, the resolved config): readers never see half of it."""
    save_atomic(text, path, lambda content, handle: handle.write(content.encode()))


def copy_atomic(source: str | Path, path: str | Path) -> None:
    """Publish an already written checkpoint file under a second name without serializing it again: a hard link
    (files are only ever replaced by rename, never changed in place, so sharing is safe), or a copy where the
    filesystem has no links; atomic like `save_atomic`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            copy_durably(source, tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def copy_durably(source: str | Path, destination: str | Path) -> None:
    """Copy a file and fsync the copy: its bytes are on disk before a rename publishes it."""
    shutil.copyfile(source, destination)
    with open(destination, "rb") as handle:
        os.fsync(handle.fileno())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a run in `output_dir` resumes from, if any."""
    path = Path(output_dir) / LATEST
    return path if path.is_file() else None


def capture_rng_state() -> dict[str, Any]:
    """Every random generator the training step draws from, as plain data."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
