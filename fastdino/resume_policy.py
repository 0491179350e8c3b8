"""What a rerun into the folder of an existing run may change.

A rerun continues the run it finds. Settings that do not touch the trajectory (logging, checkpoint cadence,
evaluation, loader workers, where the images and the run live) may change; so may the way the same algorithm is
computed (device, precision, fast paths, attention kernel, distribution strategy: the continuation is then not
bit-identical), the number of epochs upwards (the schedules are recomputed for the new length, as the reference
does), and the per-process batch (the run continues by images seen). Any other change would silently mix two runs:
it stops with the differing keys and the two ways out.
"""
from __future__ import annotations

from typing import Any

from fastdino.config import Config, config_to_dict
from fastdino.errors import UsageError

# Dotted keys, or prefixes ending in ".", of settings that leave every trained number unchanged.
SAME_TRAJECTORY = ("log_every", "monitor_every", "checkpoint_every", "saveckp_freq", "output_dir", "resume",
                   "eval.", "data.num_workers", "data.path", "resume_from.", "guard.")
# Settings that change how the same algorithm is computed, not what it computes.
SAME_ALGORITHM = ("device", "precision", "fast.", "model.attention", "distributed.", "data.loader",
                  "data.micro_batches")
# The run continues by images seen (`step_by_images_seen`).
BATCH = ("data.batch_size_per_gpu",)

# Keys added later whose value, in a run from before, was another key's: the position grid was the crop's.
WAS_THEN = {"model.pos_embed_size": "data.global_crop_size"}


class RunChangedError(UsageError):
    """The output folder holds a run with other settings; continuing would mix the two."""


def flatten(content: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as {dotted key: value}, tuples as lists (a checkpoint may hold either)."""
    flat: dict[str, Any] = {}
    for key, value in content.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == pattern or (pattern.endswith(".") and key.startswith(pattern)) for pattern in patterns)


def stored_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as {dotted key: value}; a key it lacks (a run from an older version) is its default, or
    what it meant then (`WAS_THEN`). Not re-validated (its resume_from.path, say, may be gone)."""
    saved = flatten(stored)
    settings = {**flatten(config_to_dict(Config())), **saved}
    settings.update({key: settings[source] for key, source in WAS_THEN.items() if key not in saved})
    return settings


def changed_settings(stored: dict[str, Any], current: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, current value)} for every setting that differs (`stored_settings`)."""
    old = stored_settings(stored)
    new = flatten(config_to_dict(current))
    return {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_resume(stored: dict[str, Any], current: Config) -> list[str]:
    """Lines that tell what changed since the checkpoint, or RunChangedError if the change is not allowed."""
    changes = changed_settings(stored, current)
    refused = {key: change for key, change in changes.items()
               if not _matches(key, SAME_TRAJECTORY + SAME_ALGORITHM + BATCH)
               and not (key == "optim.epochs" and change[1] > change[0])}
    if refused:
        raise RunChangedError(
            f"{current.output_dir} holds a run trained with other settings ({_describe(refused)}); to keep it, "
            f"pass another output_dir=...; to start over in this folder, add resume=false (the old run's files are "
            f"moved into a replaced-<date> folder inside it)")
    notes = []
    same = {key: change for key, change in changes.items() if _matches(key, SAME_TRAJECTORY)}
    if same:
        notes.append(f"changed since the checkpoint, without effect on training: {_describe(same)}")
    algorithm = {key: change for key, change in changes.items() if _matches(key, SAME_ALGORITHM)}
    if algorithm:
        notes.append(f"changed since the checkpoint: {_describe(algorithm)}; the same algorithm continues, but not "
                     "bit-identically to an uninterrupted run")
    return notes


def step_by_images_seen(state: dict[str, Any], world_size: int, batch_size_per_gpu: int,
                        steps_per_epoch: int) -> tuple[int, str]:
    """The step at which a run saved with another number of processes or per-process batch continues: the first
    image of the epoch it had not trained on (rounded down to a whole batch), not the same step count; with the line
    that says so ("" when nothing changed)."""
    global_batch = world_size * batch_size_per_gpu
    old_world = state.get("world_size", len(state["rng"]))
    old_batch = state.get("global_batch", global_batch)
    old_steps = state.get("steps_per_epoch", steps_per_epoch)
    if (old_world, old_batch, old_steps) == (world_size, global_batch, steps_per_epoch):
        return state["step"], ""
    epoch, within = divmod(state["step"], old_steps)
    images = within * old_batch
    step = epoch * steps_per_epoch + min(images // global_batch, steps_per_epoch)
    return step, (f"resuming a run saved at {old_world} x {old_batch // old_world} (processes x batch per process) "
                  f"with {world_size} x {batch_size_per_gpu}: continuing by images seen, at image {images} of epoch "
                  f"{epoch} (step {state['step']} there, step {step} here); the lr follows the new total batch")
