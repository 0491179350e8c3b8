"""Continue a run of the reference `main_dino.py` (facebookresearch/dino) in fastdino, and write a fastdino run as a
checkpoint that `main_dino.py` resumes.

    python train.py --config configs/vit_small_p16.yaml data.path=... output_dir=NEW resume_from.path=REF/checkpoint.pth
    python -m fastdino.export runs/x/checkpoint.pth --format reference-run --out REF2/checkpoint.pth

`main_dino.py` writes `checkpoint.pth` at every epoch end: `student` (DDP's keys, `module.backbone.*`,
`module.head.*`), `teacher` (`module.` only when it holds batch norms), `optimizer` (torch's state dict: moments
numbered by position over two parameter groups, regularized weights then biases and 1-D tensors, whose lr and weight
decay are numpy floats from its schedules), `fp16_scaler` (when trained in fp16, its default), `epoch` (the next
epoch to run), `args` (an argparse.Namespace) and `dino_loss` (the center). Optimizer moments are matched to
parameters by name: the numbering is rebuilt from the reference's module layout (`reference_order`), never from
fastdino's, whose last layer registers `weight_v` before `weight_g`. Files are read as data (fastdino.hub's allow-list:
tensors, the Namespace, numpy scalars and dtypes, nothing else).
"""
from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdino import checkpoint, sharded_checkpoint
from fastdino.builders import precision_name
from fastdino.config import Config, config_to_dict, get_value, set_value, validate
from fastdino.rules import show
from fastdino.errors import UsageError
from fastdino.hub import canonical_name, load_checkpoint_file
from fastdino.resume_policy import flatten, stored_settings

log = logging.getLogger("fastdino")

# main_dino.py argument -> the fastdino setting that means the same; a difference changes what is trained.
RECIPE_ARGS = {
    "arch": "model.arch", "patch_size": "model.patch_size", "out_dim": "model.out_dim",
    "norm_last_layer": "model.norm_last_layer", "use_bn_in_head": "model.use_bn_in_head",
    "drop_path_rate": "model.drop_path_rate", "momentum_teacher": "dino.momentum_teacher",
    "warmup_teacher_temp": "dino.warmup_teacher_temp", "teacher_temp": "dino.teacher_temp",
    "warmup_teacher_temp_epochs": "dino.warmup_teacher_temp_epochs", "optimizer": "optim.optimizer",
    "lr": "optim.lr", "min_lr": "optim.min_lr", "warmup_epochs": "optim.warmup_epochs",
    "weight_decay": "optim.weight_decay", "weight_decay_end": "optim.weight_decay_end",
    "clip_grad": "optim.clip_grad", "freeze_last_layer": "optim.freeze_last_layer", "epochs": "optim.epochs",
    "global_crops_scale": "data.global_crops_scale", "local_crops_scale": "data.local_crops_scale",
    "local_crops_number": "data.local_crops_number",
}
# What main_dino.py fixes in its code (its args do not record it), as fastdino settings; None: the arch's own depth.
REFERENCE_CONSTANTS = {
    "model.depth": None, "model.pos_embed_size": 224, "model.head_hidden_dim": 2048,
    "model.head_bottleneck_dim": 256, "model.head_nlayers": 3, "data.global_crop_size": 224,
    "data.local_crop_size": 96, "dino.student_temp": 0.1, "dino.center_momentum": 0.9,
}
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "args", "dino_loss")
# The registration order of every name component in the reference's ViT, head and their layers: sorting names by
# it gives the order of main_dino.py's `named_parameters()` (weight_norm registers weight_g before weight_v).
_LAYOUT = ("backbone", "head", "cls_token", "pos_embed", "patch_embed", "blocks", "norm1", "attn", "qkv", "proj",
           "norm2", "mlp", "fc1", "fc2", "norm", "last_layer", "weight", "bias", "running_mean", "running_var",
           "num_batches_tracked", "weight_g", "weight_v")
_RANK = {name: rank for rank, name in enumerate(_LAYOUT)}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# The reference builds `torch.optim.AdamW(params_groups)`: how the update is computed is its own choice, not the run's.
_IMPLEMENTATION_DEFAULTS = {"foreach": None, "fused": None, "capturable": False}


class ReferenceRunError(UsageError):
    """A reference checkpoint that fastdino cannot continue as configured, or a run main_dino.py cannot resume."""


@dataclass
class ReferenceRun:
    """A main_dino.py checkpoint read as data, and the config to continue it with (its recipe values adopted when
    resume_from.trust_reference_args)."""

    path: Path
    content: dict[str, Any]
    config: Config


# ------------------------------------------------------------------------------------------------ names and order
def reference_order(name: str) -> tuple[int, ...]:
    """Sort key: where `name` (canonical) comes in main_dino.py's `named_parameters()` / `state_dict()`."""
    try:
        return tuple(int(part) if part.isdigit() else _RANK[part] for part in name.split("."))
    except KeyError:
        raise ReferenceRunError(f"{name!r} is not a tensor of main_dino.py's ViT and DINO head") from None


def reference_parameter_groups(student: Mapping[str, torch.Tensor], norm_last_layer: bool) -> list[list[str]]:
    """main_dino.py's two optimizer groups (`utils.get_params_groups`) as names, each in its optimizer's order:
    regularized weights, then biases and 1-D tensors. The frozen norm of a normalized last layer is in neither."""
    names = sorted((name for name in student if not name.endswith(_BUFFERS)), key=reference_order)
    trainable = [name for name in names if not (norm_last_layer and name.endswith("last_layer.weight_g"))]
    regularized = [name for name in trainable if not name.endswith(".bias") and student[name].ndim > 1]
    return [regularized, [name for name in trainable if name not in set(regularized)]]


def _canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {canonical_name(key): value for key, value in state.items()}


def _few(names: list[str], limit: int = 4) -> str:
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + f"] ({len(names)})"


# ------------------------------------------------------------------------------------------------ reading
def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """A main_dino.py checkpoint, read as data; ReferenceRunError when it lacks what main_dino.py saves."""
    content = dict(load_checkpoint_file(path))
    missing = [key for key in REQUIRED_KEYS if key not in content]
    if missing:
        hint = " (a fastdino run is continued by pointing output_dir at its folder)" if "config" in content else ""
        raise ReferenceRunError(f"{path} is not a checkpoint of main_dino.py: it lacks {', '.join(missing)}{hint}")
    if not isinstance(content["args"], argparse.Namespace):
        raise ReferenceRunError(f"{path}: its args are a {type(content['args']).__name__}, not main_dino.py's "
                                "argparse.Namespace")
    return content


def reference_optimizer_by_name(content: Mapping[str, Any], source: Any) -> tuple[dict[str, dict], list[dict]]:
    """The reference optimizer's per-parameter state keyed by parameter name, and its groups with names as params."""
    student = _canonical(content["student"])
    expected = reference_parameter_groups(student, bool(getattr(content["args"], "norm_last_layer", True)))
    saved = content["optimizer"]
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != [len(names) for names in expected]:
        raise ReferenceRunError(f"{source}: its optimizer groups hold {sizes} parameters, but main_dino.py's student "
                                f"in it has {[len(names) for names in expected]} (regularized, not regularized)")
    name_of = {index: name for group, names in zip(saved["param_groups"], expected)
               for index, name in zip(group["params"], names)}
    groups = [{**{key: value for key, value in group.items() if key != "params"}, "params": names}
              for group, names in zip(saved["param_groups"], expected)]
    return {name_of[index]: dict(state) for index, state in saved["state"].items()}, groups


# ------------------------------------------------------------------------------------------------ args
def _plain(value: Any) -> Any:
    """An args or config value in one comparable form: numpy scalars as Python numbers, sequences as lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def recipe_differences(args: argparse.Namespace, config: Config) -> dict[str, tuple[str, Any, Any]]:
    """{setting: (main_dino.py argument, its value, the config's)} where they differ; arguments a main_dino.py
    version did not have are skipped."""
    recorded = vars(args)
    differences = {}
    for arg, key in RECIPE_ARGS.items():
        if arg not in recorded:
            continue
        theirs, ours = _plain(recorded[arg]), _plain(get_value(config, key))
        if arg == "arch":
            theirs = str(theirs).replace("deit", "vit")  # main_dino.py renames DeiT to ViT before saving
        if theirs != ours:
            differences[key] = (arg, theirs, ours)
    return differences


def reconcile(content: Mapping[str, Any], config: Config, path: Path, world_size: int) -> tuple[Config, list[str]]:
    """The config to continue with and lines to log. Recipe differences are refused in one line naming each setting,
    or adopted with resume_from.trust_reference_args; more epochs than the reference's are allowed (the schedules are
    recomputed for them, as main_dino.py does when resumed with a larger --epochs)."""
    args, notes = content["args"], []
    differences = recipe_differences(args, config)
    longer = differences.get("optim.epochs")
    if longer and longer[2] > longer[1]:
        del differences["optim.epochs"]
        notes.append(f"optim.epochs={longer[2]}: main_dino.py ran --epochs {longer[1]}; every schedule is recomputed "
                     f"for {longer[2]} epochs, as main_dino.py does when resumed with a larger --epochs")
    if differences and not config.resume_from.trust_reference_args:
        given = ", ".join(f"--{arg} {show(theirs)}" for arg, theirs, _ in differences.values())
        ours = ", ".join(f"{key}={show(value)}" for key, (_, _, value) in differences.items())
        wanted = " ".join(f"{key}={show(theirs)}" for key, (_, theirs, _) in differences.items())
        raise ReferenceRunError(f"{path} was trained with {given}, which this config changes ({ours}): continuing "
                                f"would change the recipe; set {wanted}, or add resume_from.trust_reference_args=true "
                                "to adopt the reference's values")
    if differences:
        config = copy.deepcopy(config)
        for key, (_, theirs, _) in differences.items():
            set_value(config, key, theirs)
        validate(config)
        notes.append("adopted the reference's args (resume_from.trust_reference_args): " +
                     ", ".join(f"{key}={show(theirs)} (was {show(ours)})" for key, (_, theirs, ours) in
                               differences.items()))
    epoch = int(content["epoch"])
    if epoch >= config.optim.epochs:
        raise ReferenceRunError(f"{path} has trained all {epoch} epochs of optim.epochs={config.optim.epochs}; to "
                                f"train it further, pass optim.epochs=N with N > {epoch}")
    notes += _batch_and_constant_notes(args, config, world_size)
    return config, notes


def _batch_and_constant_notes(args: argparse.Namespace, config: Config, world_size: int) -> list[str]:
    notes, recorded = [], vars(args)
    per_process = int(recorded.get("batch_size_per_gpu", config.data.batch_size_per_gpu))
    theirs, ours = per_process * int(recorded.get("world_size", 1)), config.data.batch_size_per_gpu * world_size
    if theirs != ours:
        notes.append(f"main_dino.py trained with a total batch of {theirs}, fastdino continues with {ours}: the lr "
                     "follows the new total batch (linear scaling) and an epoch has another number of steps")
    if differing := constants_differing(flatten(config_to_dict(config))):
        notes.append(f"main_dino.py fixes settings its args do not record; this config has {differing}: fastdino "
                     "continues with the config's values (the checkpoint's tensor shapes are checked)")
    return notes


def constants_differing(settings: Mapping[str, Any]) -> str:
    """The settings main_dino.py fixes in code that `settings` (a flattened config) sets otherwise, as
    `key=value (main_dino.py: fixed)`."""
    parts = []
    for key, fixed in REFERENCE_CONSTANTS.items():
        value = settings[key]
        if value != fixed and not (key == "model.depth" and value == 12):
            parts.append(f"{key}={show(value)} (main_dino.py: {show(fixed) if fixed is not None else 12})")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ reference -> fastdino
def open_reference_run(config: Config, world_size: int = 1, is_main: bool = True) -> ReferenceRun | None:
    """The main_dino.py run that resume_from.path names, read and checked, or None when there is none to read: no
    resume_from.path, or output_dir holds a fastdino run (which always wins) and the reference's args are not
    trusted. With trust, a rerun reads them again so that its config is the one the run started with."""
    if not config.resume_from.path:
        return None
    own_run = config.resume and sharded_checkpoint.find_resume_checkpoint(config.output_dir) is not None
    if own_run and not config.resume_from.trust_reference_args:
        return None
    path = Path(config.resume_from.path).expanduser()
    content = read_reference_checkpoint(path)
    adopted, notes = reconcile(content, config, path, world_size)
    if is_main:
        for note in notes:
            log.info(note)
    return ReferenceRun(path, content, adopted)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {canonical_name(name): tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _check_fits(theirs: Mapping[str, torch.Tensor], module: nn.Module, path: Path, network: str) -> None:
    """Every tensor of `module` in the file, with its shape; else one line naming the first difference."""
    ours = _shapes(module)
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise ReferenceRunError(f"{path}: its {network} does not fit the network this config builds (model.arch, "
                                f"model.depth, model.head_nlayers, model.use_bn_in_head): missing {_few(missing)}, "
                                f"unexpected {_few(unexpected)}")
    for name, shape in ours.items():
        if tuple(theirs[name].shape) != shape:
            raise ReferenceRunError(f"{path}: {network} tensor {name} is {tuple(theirs[name].shape)} there and "
                                    f"{shape} in the network this config builds (see model.patch_size, "
                                    "model.pos_embed_size, model.out_dim and the model.head_* settings)")


def _optimizer_state(content: Mapping[str, Any], student: nn.Module, optimizer: torch.optim.Optimizer,
                     path: Path) -> dict[str, Any]:
    """The reference's moments and steps as fastdino's optimizer state dict (parameter names as keys), under fastdino's
    own group settings with the reference's last lr and weight decay."""
    by_name, reference_groups = reference_optimizer_by_name(content, path)
    name_of = {id(param): canonical_name(name) for name, param in student.named_parameters()}
    ours = [[name_of[id(param)] for param in group["params"]] for group in optimizer.param_groups]
    if [set(names) for names in ours] != [set(group["params"]) for group in reference_groups]:
        raise ReferenceRunError(f"{path}: its optimizer groups hold other parameters than fastdino's for this config")
    groups = [{**{key: value for key, value in group.items() if key != "params"}, "lr": float(reference["lr"]),
               "weight_decay": float(reference["weight_decay"]), "params": names}
              for group, reference, names in zip(optimizer.param_groups, reference_groups, ours)]
    state = {name: {key: torch.as_tensor(value, dtype=torch.float32) if key == "step" else value  # torch < 1.12: int
                    for key, value in entry.items()} for name, entry in by_name.items()}
    return {"state": state, "param_groups": groups}


def trainer_state(content: Mapping[str, Any], trainer: Any, path: Path) -> dict[str, Any]:
    """A main_dino.py checkpoint as the state `Trainer.load_state_dict` takes, at the first step of the epoch it saved
    as next; fresh stochastic-depth draws (no RNG state), the fp16 scaler only when fastdino trains in fp16."""
    student, teacher = _canonical(content["student"]), _canonical(content["teacher"])
    _check_fits(student, trainer.student, path, "student")
    _check_fits(teacher, trainer.teacher, path, "teacher")
    state = {"student": student, "teacher": teacher,
             "optimizer": _optimizer_state(content, trainer.student, trainer.optimizer, path),
             "dino_loss": {"center": content["dino_loss"]["center"]},
             "step": int(content["epoch"]) * len(trainer.loader), "rng": []}
    if trainer.scaler is not None and "fp16_scaler" in content:
        state["scaler"] = content["fp16_scaler"]
    return state


def continue_reference_run(trainer: Any, reference: ReferenceRun) -> None:
    """Load the reference's student, teacher, center and optimizer moments into `trainer`; it goes on at the epoch
    main_dino.py would have run next. An fp16 loss-scaler state that fastdino has no use for is dropped, said once."""
    state = trainer_state(reference.content, trainer, reference.path)
    trainer.load_state_dict(state)
    if not trainer.ctx.is_main:
        return
    scaler = reference.content.get("fp16_scaler")
    if scaler is not None and trainer.scaler is None:
        log.info("dropped the reference's fp16 loss-scaler state (scale %g): fastdino trains in %s, which needs no "
                 "loss scaling", float(scaler["scale"]), precision_name(trainer.autocast_dtype))
    log.info("continuing the main_dino.py run %s at epoch %d (step %d): student, teacher, center and the optimizer "
             "moments of %d parameters loaded by name", reference.path, int(reference.content["epoch"]),
             trainer.step, len(state["optimizer"]["state"]))


# ------------------------------------------------------------------------------------------------ fastdino -> reference
def reference_args(settings: Mapping[str, Any], state: Mapping[str, Any]) -> argparse.Namespace:
    """main_dino.py's args for a fastdino run (`settings`: its flattened config), as its parser and
    `init_distributed_mode` leave them."""
    recipe = {arg: settings[key] for arg, key in RECIPE_ARGS.items()}
    return argparse.Namespace(
        **recipe, use_fp16="scaler" in state, batch_size_per_gpu=settings["data.batch_size_per_gpu"],
        data_path=settings["data.path"], output_dir=settings["output_dir"], saveckp_freq=settings["saveckp_freq"],
        seed=settings["seed"], num_workers=settings["data.num_workers"], dist_url="env://", local_rank=0, rank=0,
        world_size=int(state.get("world_size", 1)), gpu=0)


def reference_checkpoint(state: Mapping[str, Any], source: Any) -> dict[str, Any]:
    """A fastdino checkpoint (`Trainer.state_dict()`, unsharded) as the dict main_dino.py saves at an epoch end."""
    settings = stored_settings(state["config"])
    epoch, within = divmod(int(state["step"]), int(state["steps_per_epoch"]))
    if within:
        raise ReferenceRunError(f"{source} was saved at step {state['step']}, inside epoch {epoch} ({within} of its "
                                f"{state['steps_per_epoch']} steps done): main_dino.py resumes only at epoch ends; "
                                "export a checkpoint written at one (the run's checkpoint.pth or checkpoint_dcp/ after "
                                "an epoch, or a numbered checkpointNNNN.pth or checkpointNNNN_dcp/)")
    student = {name: state["student"][name] for name in sorted(state["student"], key=reference_order)}
    groups = reference_parameter_groups(student, settings["model.norm_last_layer"])
    ours = state["optimizer"]
    if [set(group["params"]) for group in ours["param_groups"]] != [set(names) for names in groups]:
        raise ReferenceRunError(f"{source}: its optimizer groups are not main_dino.py's (regularized weights, then "
                                "biases and 1-D tensors)")
    index = {name: position for position, name in enumerate(name for names in groups for name in names)}
    param_groups = [{**{key: value for key, value in group.items() if key != "params"},
                     **{key: value for key, value in _IMPLEMENTATION_DEFAULTS.items() if key in group},
                     "params": [index[name] for name in names]} for group, names in zip(ours["param_groups"], groups)]
    batch_norms = any(name.endswith(_BUFFERS) for name in state["teacher"])  # main_dino.py wraps it in DDP then
    saved = {
        "student": {f"module.{name}": tensor for name, tensor in student.items()},
        "teacher": {("module." if batch_norms else "") + name: state["teacher"][name]
                    for name in sorted(state["teacher"], key=reference_order)},
        "optimizer": {"state": {index[name]: dict(entry) for name, entry in ours["state"].items()},
                      "param_groups": param_groups},
        "epoch": epoch,
        "args": reference_args(settings, state),
        "dino_loss": {"center": state["dino_loss"]["center"]},
    }
    if "scaler" in state:
        saved["fp16_scaler"] = state["scaler"]
    return saved


def _check_written(out: Path, state: Mapping[str, Any]) -> None:
    """Read `out` back as data and compare every tensor with the run's, by name (networks, center, moments)."""
    content = read_reference_checkpoint(out)
    moments, _ = reference_optimizer_by_name(content, out)
    pairs = [(_canonical(content["student"]), state["student"]), (_canonical(content["teacher"]), state["teacher"]),
             (content["dino_loss"], state["dino_loss"])]
    pairs += [(moments[name], entry) for name, entry in state["optimizer"]["state"].items()]
    for written, expected in pairs:
        if written.keys() != expected.keys() or not all(torch.equal(torch.as_tensor(written[key]),
                                                                    torch.as_tensor(expected[key]))
                                                        for key in expected):
            raise RuntimeError(f"{out} does not hold the run's tensors (read back by name)")


def export_reference_run(source: str | Path, out: str | Path) -> str:
    """Write the fastdino run saved in `source` (a checkpoint.pth, or a sharded run's checkpoint_dcp/ folder, read
    unsharded) as a main_dino.py checkpoint at `out`, read it back and check it; returns the one-line description."""
    source, out = Path(source), Path(out)
    if out.suffix == ".safetensors":
        raise ReferenceRunError(f"--out {out}: a reference run is the checkpoint.pth main_dino.py resumes (torch.save "
                                "of tensors and numbers), not safetensors; name it .pth")
    state = sharded_checkpoint.read_unsharded(source) if source.is_dir() else checkpoint.load(source)
    if not isinstance(state, Mapping) or "config" not in state:
        raise ReferenceRunError(f"{source} is not a fastdino training checkpoint (no config in it)")
    saved = reference_checkpoint(state, source)
    checkpoint.save_atomic(saved, out)
    _check_written(out, state)
    args = saved["args"]
    differing = constants_differing(stored_settings(state["config"]))
    caveat = (f"; main_dino.py fixes what this run sets otherwise ({differing}): its code must be changed to match"
              if differing else "")
    resume = "" if out.name == checkpoint.LATEST else f" (main_dino.py resumes <output_dir>/{checkpoint.LATEST})"
    return (f"wrote {out}: the fastdino run {source} as a main_dino.py checkpoint at epoch {saved['epoch']} "
            f"(--arch {args.arch} --patch_size {args.patch_size} --out_dim {args.out_dim}; student, teacher, center "
            f"and the moments of {len(saved['optimizer']['state'])} parameters, numbered as main_dino.py's "
            f"optimizer); read back as data, same tensors by name{resume}{caveat}")
