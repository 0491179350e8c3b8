"""Atomic checkpoints of plain data (loadable with `torch.load(weights_only=True)`) and exact-resume RNG state."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "checkpoint.pth"


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash at any moment leaves
    either the previous file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic` (plain tensors, numbers, strings: no pickled objects)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
