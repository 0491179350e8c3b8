"""Every training setting as a dataclass, loaded from YAML and overridden with `key=value` strings.

Defaults are those of the reference `main_dino.py`; recipe files under `configs/` set the paper's values.
Validation happens here, before anything heavy starts: an unknown key names the valid ones, a wrong type
names the expected one.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

Switch = Union[bool, str]  # True, False or "auto" (on where the device supports it)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says how to fix it."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base
    patch_size: int = 16
    depth: int | None = None  # None: the architecture's own (12); smaller for quick CPU runs
    out_dim: int = 65536
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    drop_path_rate: float = 0.1
    attention: str = "auto"  # auto | xformers | sdpa | math


@dataclass
class DataConfig:
    path: str = ""
    loader: str = "auto"  # auto (CUDA: DALI if installed, else gpu_decode; CPU: torch) | dali | gpu_decode | torch
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    global_crop_size: int = 224
    local_crop_size: int = 96
    batch_size_per_gpu: int = 64
    num_workers: int = 10


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 0.0005  # peak lr for a total batch of 256, scaled linearly with the batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm cap; 0 disables
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update
    epochs: int = 100


@dataclass
class DinoConfig:
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class FastConfig:
    """One switch per fast path, so that a benchmark can turn each on alone."""

    fused_loss: Switch = "auto"  # Triton DINO loss (CUDA)
    fused_ema: Switch = "auto"  # Triton EMA over flat buffers (CUDA)
    packed: Switch = "auto"  # all crops in one packed forward (CUDA with xformers)
    efficient_drop_path: Switch = "auto"  # residual branches only for kept samples (CUDA)
    fused_adamw: Switch = "auto"  # torch.optim.AdamW(fused=True) (CUDA)
    sync_free_clip: Switch = "auto"  # per-parameter clipping without a host sync per parameter (everywhere)
    compile: Switch = False  # torch.compile of the transformer blocks


@dataclass
class EvalConfig:
    knn_train_path: str = ""  # labelled ImageFolder used as the kNN memory bank
    knn_val_path: str = ""  # labelled ImageFolder used as kNN queries
    knn_every_epochs: int = 0  # periodic kNN during training; 0 disables
    knn_k: int = 20
    knn_temperature: float = 0.07
    image_size: int = 224  # evaluation resolution
    final_knn: bool = False  # after training: kNN of the teacher and of a random-init twin
    attention_images: int = 0  # after training: attention pictures of this many bundled photos
    attention_image_size: int = 224  # resolution of those pictures (the position embedding is interpolated)


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto (fsdp when world size > 1) | fsdp | ddp | none
    activation_checkpointing: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "."
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    log_every: int = 10  # steps between log lines (and non-finite loss checks)
    monitor_every: int = 50  # steps between collapse monitors (teacher entropy, KL)
    checkpoint_every: int = 0  # steps between checkpoints; 0: epoch ends only
    saveckp_freq: int = 20  # keep a numbered copy every this many epochs; 0 disables


_CHOICES = {
    "model.arch": ("vit_tiny", "vit_small", "vit_base"),
    "model.attention": ("auto", "xformers", "sdpa", "math"),
    "data.loader": ("auto", "dali", "gpu_decode", "torch"),
    "optim.optimizer": ("adamw", "sgd"),
    "distributed.strategy": ("auto", "fsdp", "ddp", "none"),
    "device": ("auto", "cuda", "cpu"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` as the type `annotation` describes, or raise ConfigError naming the key."""
    if annotation == Switch:
        if value in (True, False, "auto"):
            return value
        raise ConfigError(f"{key}: expected true, false or auto, got {value!r}")
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {' or '.join(o.__name__ for o in options)}")
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key}: expected a list of {len(item_types)} numbers, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, item_types))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _valid_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def set_value(config: Config, dotted_key: str, value: Any) -> None:
    """Set `config.<dotted_key>` to `value`, checking that the key exists and the type fits."""
    target: Any = config
    parts = dotted_key.split(".")
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(
                f"unknown config key '{dotted_key}'. Valid keys: {', '.join(_valid_keys(config))}"
            )
        if depth < len(parts) - 1:
            target = getattr(target, name)
    name = parts[-1]
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted_key}: expected a mapping of its fields, got {value!r}")
        for sub_key, sub_value in value.items():
            set_value(config, f"{dotted_key}.{sub_key}", sub_value)
        return
    hints = typing.get_type_hints(type(target))
    coerced = _coerce(value, hints[name], dotted_key)
    if dotted_key in _CHOICES and coerced not in _CHOICES[dotted_key]:
        raise ConfigError(f"{dotted_key}: {coerced!r} is not one of {', '.join(_CHOICES[dotted_key])}")
    setattr(target, name, coerced)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML so that numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (for example optim.lr=0.001)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': cannot read the value: {error}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then the `key=value` overrides, in that order."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        content = yaml.safe_load(path.read_text()) or {}
        if not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        for key, value in content.items():
            set_value(config, key, value)
    for text in overrides:
        set_value(config, *parse_override(text))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    data, optim = config.data, config.optim
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(data, name)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.{name}: need 0 < low <= high <= 1, got ({low}, {high})")
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(data, name) % config.model.patch_size:
            raise ConfigError(f"data.{name} must be a multiple of model.patch_size ({config.model.patch_size})")
    if data.batch_size_per_gpu < 1 or data.local_crops_number < 0 or data.num_workers < 0:
        raise ConfigError("data.batch_size_per_gpu must be >= 1, local_crops_number and num_workers >= 0")
    if optim.epochs < 1 or optim.warmup_epochs > optim.epochs:
        raise ConfigError(f"optim.epochs ({optim.epochs}) must be >= 1 and >= optim.warmup_epochs")
    if config.dino.warmup_teacher_temp_epochs > optim.epochs:
        raise ConfigError("dino.warmup_teacher_temp_epochs cannot exceed optim.epochs")
    if config.eval.final_knn and not (config.eval.knn_train_path and config.eval.knn_val_path):
        raise ConfigError("eval.final_knn needs eval.knn_train_path and eval.knn_val_path")


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain data (for checkpoints and logs): nested dicts of numbers, strings and lists."""
    return dataclasses.asdict(config)


def config_from_dict(content: dict[str, Any]) -> Config:
    """Inverse of `config_to_dict`."""
    config = Config()
    for key, value in content.items():
        set_value(config, key, value)
    validate(config)
    return config
