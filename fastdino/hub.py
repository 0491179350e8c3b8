"""Checkpoint interchange: load DINO backbones from any of the usual files, export backbone-only weights.

Files understood by `backbone_state_dict` / `load_pretrained`:
  (a) official DINO backbone weights (`dino_deitsmall8_pretrain.pth`): a plain state dict with the reference's keys
      (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.<i>.*`, `norm.*`);
  (b) the released full DINO checkpoints: `{'teacher': ..., 'student': ..., 'optimizer': ..., 'args': Namespace}`
      where the student's keys carry `module.backbone.` and the teacher's `backbone.` (early releases had neither,
      and called the head `projection_head`);
  (c) fastdino's own training checkpoints: `{'teacher': {'backbone.*', 'head.*'}, ...}`, possibly with the
      `_orig_mod.` prefix that `torch.compile` adds, as a `.pth` file or a sharded `checkpoint_dcp/` folder.
Every file is read as data (fastdino.checkpoint). The network is rebuilt from the weights' own shapes (embedding width
-> architecture, patch size, depth, position-embedding grid), so no architecture flags are needed; flags that are
given are checked against the file. Head weights are dropped. Exported files hold exactly the reference's backbone keys, so they load with
`strict=True` into the reference ViT, into `fastdino.models` and into timm's `vit_*_patch*_224(num_classes=0)`.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdino import checkpoint as checkpoint_io
from fastdino import sharded_checkpoint
from fastdino.errors import UsageError
from fastdino.models.vit import ARCHITECTURES
from fastdino.rules import multiple_of

# Wrapper prefixes stripped from the front of every key, in any order and number.
WRAPPERS = frozenset({"module", "_orig_mod"})  # the key components DDP and torch.compile add to a state dict
# First key component of every backbone tensor of the reference ViT.
_BACKBONE_ROOTS = frozenset({"cls_token", "pos_embed", "patch_embed", "blocks", "norm"})
# First key component of projection-head tensors, current (`head`) and pre-release names; these are dropped.
_HEAD_ROOTS = frozenset({"head", "projection_head", "prototypes", "last_layer", "mlp"})


def _reference_checkpoint_globals() -> list[Any]:
    """What a full checkpoint of the reference main_dino.py holds beside tensors: its `argparse.Namespace` of
    arguments, and numpy scalars (the lr and weight decay it sets on each optimizer group come from numpy schedules)
    with their dtypes. Nothing else is allowed. numpy 1.x wrote the scalar under `numpy.core`, numpy 2 `numpy._core`."""
    scalar = np._core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
                     if name.endswith("DType") and name[:-5] in ("Float16", "Float32", "Float64", "Int8", "Int16",
                                                                 "Int32", "Int64", "UInt8", "UInt16", "UInt32",
                                                                 "UInt64", "Bool")]
    return [argparse.Namespace, scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes]


def load_checkpoint_file(path: str | os.PathLike) -> Mapping:
    """Read a checkpoint as data onto the CPU: a `.pth` file (`fastdino.checkpoint.load`, with the reference
    checkpoints' own types allowed) or a sharded `checkpoint_dcp/` folder (its networks only)."""
    path = Path(path)
    if path.is_dir():
        return sharded_checkpoint.read_unsharded(path, ("teacher", "student"))
    content = checkpoint_io.load(path, allowed_globals=_reference_checkpoint_globals())
    if not isinstance(content, Mapping):
        raise checkpoint_io.CheckpointError(
            f"{path} holds a {type(content).__name__}, expected a dict (state dict or checkpoint)")
    return content


def canonical_name(key: str) -> str:
    """A state-dict key without wrapper components: `module.head.mlp.0.weight` -> `head.mlp.0.weight` (the one rule
    of every reader: backbones, reference runs, the linear probe's classifier)."""
    return ".".join(part for part in key.split(".") if part not in WRAPPERS)


def _describe_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} keys)"


def _is_tensor_dict(mapping: Mapping) -> bool:
    return len(mapping) > 0 and all(isinstance(v, torch.Tensor) for v in mapping.values())


def backbone_state_dict(checkpoint: Mapping, checkpoint_key: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors of any supported checkpoint, under the reference's key names.

    `checkpoint` is a plain state dict (format a) or a training checkpoint (formats b, c) whose `checkpoint_key`
    entry ('teacher' or 'student') holds the network. Raises ValueError listing the keys seen when the format is not
    recognized.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a dict-like checkpoint or state dict, got {type(checkpoint).__name__}")
    if _is_tensor_dict(checkpoint):
        state_dict = checkpoint
    elif isinstance(checkpoint.get(checkpoint_key), Mapping):
        state_dict = checkpoint[checkpoint_key]
        if not _is_tensor_dict(state_dict):
            raise ValueError(
                f"checkpoint entry {checkpoint_key!r} is not a state dict of tensors; it holds "
                f"{_describe_keys(list(state_dict))}"
            )
    else:
        raise ValueError(
            f"unrecognized checkpoint format: neither a state dict of tensors nor a dict with a {checkpoint_key!r} "
            f"state dict; top-level keys: {_describe_keys(list(checkpoint))}"
        )

    backbone, unknown = {}, []
    for key, tensor in state_dict.items():
        name = canonical_name(key).removeprefix("backbone.")
        root = name.split(".", 1)[0]
        if root in _BACKBONE_ROOTS:
            if name in backbone:
                raise ValueError(f"two checkpoint keys map to the backbone key {name!r} after removing prefixes")
            backbone[name] = tensor
        elif root not in _HEAD_ROOTS:
            unknown.append(key)
    if unknown:
        raise ValueError(f"checkpoint has keys that belong to neither a DINO ViT backbone nor its head: "
                         f"{_describe_keys(unknown)}")
    if not backbone:
        raise ValueError(f"no ViT backbone weights found; keys seen: {_describe_keys(list(state_dict))}")
    return backbone


def _check_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, patch_size: int) -> None:
    """Explain the usual mismatches (wrong arch / patch size / image size) before load_state_dict's generic error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {arch} (patch {patch_size}): missing {_describe_keys(missing)}, "
                         f"unexpected {_describe_keys(unexpected)}")
    proj = state_dict["patch_embed.proj.weight"]
    if proj.shape != expected["patch_embed.proj.weight"].shape:
        raise ValueError(f"checkpoint has embed dim {proj.shape[0]} and patch size {proj.shape[-1]}, but {arch} with "
                         f"patch_size={patch_size} has embed dim {expected['patch_embed.proj.weight'].shape[0]} and "
                         f"patch size {patch_size}: pass the matching arch/patch_size")
    if state_dict["pos_embed"].shape != expected["pos_embed"].shape:
        raise ValueError(f"checkpoint pos_embed has {state_dict['pos_embed'].shape[1]} tokens, the model "
                         f"{expected['pos_embed'].shape[1]}: build the model with the training image size (img_size)")
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"shape of {key!r} is {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(expected[key].shape)} in {arch}: pass the matching arch")


def describe_backbone(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ViT a backbone state dict (reference keys) belongs to, from its shapes: arch (by embedding width),
    patch_size, depth and img_size (the position-embedding grid times the patch size)."""
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    arch = next((name for name, shape in ARCHITECTURES.items() if shape["embed_dim"] == embed_dim), None)
    if arch is None:
        known = ", ".join(f"{name}: {shape['embed_dim']}" for name, shape in ARCHITECTURES.items())
        raise ValueError(f"embedding width {embed_dim} is none of the known architectures ({known})")
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    return {"arch": arch, "patch_size": patch_size, "depth": depth, "img_size": grid * patch_size}


def _check_requested(found: dict[str, Any], requested: dict[str, Any], source: Any) -> None:
    """A flag that contradicts the file is one clear line, not a size-mismatch traceback."""
    for name, value in requested.items():
        if value is not None and value != found[name]:
            raise checkpoint_io.CheckpointError(
                f"{source} holds a {found['arch']} backbone with patch size {found['patch_size']} and depth "
                f"{found['depth']}, not {name}={value}; leave out the flag, or pass the matching checkpoint")


def load_pretrained(path: str | os.PathLike | Mapping, arch: str | None = None, patch_size: int | None = None,
                    checkpoint_key: str = "teacher", **model_kwargs) -> nn.Module:
    """Load a checkpoint's backbone into the `fastdino.models` ViT its weights describe.

    `path` is a file, a sharded checkpoint folder or an already-loaded checkpoint dict in any supported format (see
    module docstring); `checkpoint_key` picks 'teacher' (DINO's evaluation default) or 'student' in training
    checkpoints. `arch` and `patch_size`, when given, must match the file. Returns the model in eval mode on the
    CPU; every backbone tensor is loaded (strict).
    """
    from fastdino.models import build_vit

    checkpoint = path if isinstance(path, Mapping) else load_checkpoint_file(path)
    state_dict = backbone_state_dict(checkpoint, checkpoint_key)
    found = describe_backbone(state_dict)
    _check_requested(found, {"arch": arch, "patch_size": patch_size}, "the checkpoint" if isinstance(path, Mapping)
                     else path)
    shape = {"depth": found["depth"], "img_size": found["img_size"], **model_kwargs}
    model = build_vit(found["arch"], patch_size=found["patch_size"], **shape)
    _check_shapes(model, state_dict, found["arch"], found["patch_size"])
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def export_backbone(checkpoint_or_state_dict: str | os.PathLike | Mapping | nn.Module, out_path: str | os.PathLike,
                    checkpoint_key: str = "teacher") -> Path:
    """Write a backbone-only state dict with the reference's keys (the format of the official DINO weights).

    Accepts a checkpoint file, a loaded checkpoint / state dict, or a module (backbone or multi-crop wrapper).
    The file is written atomically (temporary file, then rename). Returns the output path.
    """
    source = checkpoint_or_state_dict
    if isinstance(source, nn.Module):
        source = source.state_dict()
    elif not isinstance(source, Mapping):
        source = load_checkpoint_file(source)
    state_dict = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone_state_dict(source,
                                                                                               checkpoint_key).items()}
    out_path = Path(out_path)
    checkpoint_io.save_atomic(state_dict, out_path)
    return out_path


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that say which backbone to evaluate (shared by the fastdino.eval commands)."""
    parser.add_argument("--checkpoint", required=True,
                        help="official DINO backbone .pth, released full DINO checkpoint, fastdino checkpoint.pth or "
                             "checkpoint_dcp/ folder")
    parser.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                        help="network to take from training checkpoints (default: teacher, as the reference)")
    parser.add_argument("--arch", default=None,
                        help="vit_tiny, vit_small or vit_base; default: read from the weights (if given, checked)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="default: read from the weights (if given, checked against them)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the backbone runs (cuda when there is a GPU)")


def backbone_from_arguments(args: argparse.Namespace, whole_patches: bool = False) -> nn.Module:
    """`load_pretrained` with the options of `add_backbone_arguments`; gradients off (evaluation only).
    `whole_patches`: the command feeds `--image-size` crops as they are, which must then cut into whole patches."""
    model = load_pretrained(args.checkpoint, args.arch, patch_size=args.patch_size,
                            checkpoint_key=args.checkpoint_key)
    patch = model.patch_embed.patch_size
    whole = multiple_of(patch, "the backbone's patch size")
    if whole_patches and not whole.allows(args.image_size):
        raise UsageError(f"--image-size {args.image_size}: {whole.allowed}, e.g. "
                         f"{max(patch, args.image_size // patch * patch)}")
    return model.requires_grad_(False)
