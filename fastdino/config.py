"""Every training setting as a dataclass, loaded from YAML and overridden with `key=value` strings.

Defaults are those of the reference `main_dino.py`; recipe files under `configs/` set the paper's values.
Every value is checked as it is set, before anything heavy starts: its type (from the dataclass annotation), its
range or choices (`RULES`, one rule per key), then the consistency between keys (`validate`). A bad setting is
one `ConfigError` line, `key=value: what is allowed`; an unknown key suggests the closest valid one. What the
machine must provide (a GPU, a library, the data folders) is checked by `fastdino.preflight`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastdino.errors import UsageError
from fastdino.rules import (
    area_fractions,
    between,
    choices,
    convert,
    expected_type,
    INVALID,
    multiple_of,
    non_negative,
    optional,
    or_auto,
    positive,
    Rule,
    show,
    Switch,
    unit_interval,
    zero_is_off,
    zero_means,
)


class ConfigError(UsageError, ValueError):
    """A configuration file or override that cannot be used; the message says how to fix it."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base
    patch_size: int = 16  # side in pixels of the square patches (8 or 16 in the paper)
    # side in pixels of the position-embedding grid: 224 is the reference's (every crop interpolates from it); the
    # training crop size instead gives a crop-sized grid, fewer parameters when every crop is far below 224 (demo)
    pos_embed_size: int = 224
    depth: int | None = None  # None: the architecture's own (12); smaller for quick CPU runs
    out_dim: int = 65536  # prototypes K of the head's output (the softmax size of the loss)
    norm_last_layer: bool = True  # head's last layer weight-normalized with its norm fixed (false: learned, ViT-S/16)
    use_bn_in_head: bool = False  # batch norm in the projection head's MLP
    head_hidden_dim: int = 2048  # width of the projection head's hidden layers
    head_bottleneck_dim: int = 256  # width of the head's bottleneck before the last layer
    head_nlayers: int = 3  # MLP layers in the projection head
    drop_path_rate: float = 0.1  # stochastic depth of the student's last block (linear from 0 at the first)
    attention: str = "auto"  # auto | xformers | sdpa | math


@dataclass
class DataConfig:
    path: str = ""  # training images: a folder of class folders (ImageFolder) or a flat folder of images
    loader: str = "auto"  # auto (CUDA: DALI if installed, else gpu_decode; CPU: torch) | dali | gpu_decode | torch
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area fraction range of the global crops
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area fraction range of the local crops
    local_crops_number: int = 8  # local crops per image (the paper's recipes: 10)
    global_crop_size: int = 224  # side in pixels of the two global crops
    local_crop_size: int = 96  # side in pixels of the local crops
    batch_size_per_gpu: int = 64  # images per process and step (the global batch is this times the world size)
    # split each process's batch into this many equal micro-batches, one forward and backward each, whose gradients
    # add up to the step of the whole batch (less memory, the same step; the center and optimizer move once); auto:
    # the fewest that fit the device's memory (fastdino plan shows the prediction)
    micro_batches: int | str = 1
    num_workers: int = 10  # loader worker processes per training process; 0: load in the training process


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw (the reference's default) or sgd (momentum 0.9, as the reference's); no lars
    lr: float = 0.0005  # peak lr for a total batch of 256, scaled linearly with the batch
    min_lr: float = 1e-6  # lr at the end of the cosine decay
    warmup_epochs: int = 10  # epochs of linear lr warmup from 0
    weight_decay: float = 0.04  # weight decay at the start, cosine to weight_decay_end (biases and norms: none)
    weight_decay_end: float = 0.4  # weight decay at the end of training
    clip_grad: float = 3.0  # per-parameter gradient norm cap; 0 disables
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update
    epochs: int = 100  # length of training; every schedule spans it


@dataclass
class DinoConfig:
    momentum_teacher: float = 0.996  # teacher EMA momentum at the start, cosine to 1 at the end
    warmup_teacher_temp: float = 0.04  # teacher temperature at the start of its warmup
    teacher_temp: float = 0.04  # teacher temperature after warmup_teacher_temp_epochs (the paper: up to 0.07)
    warmup_teacher_temp_epochs: int = 0  # epochs of linear teacher temperature warmup (the paper: 30)
    student_temp: float = 0.1  # student softmax temperature
    center_momentum: float = 0.9  # EMA momentum of the center subtracted from the teacher output


@dataclass
class FastConfig:
    """One switch per fast path, so that a benchmark can turn each on alone."""

    fused_loss: Switch = "auto"  # Triton DINO loss (CUDA)
    fused_ema: Switch = "auto"  # Triton EMA over flat buffers (CUDA)
    packed: Switch = "auto"  # crops in one forward (CUDA: xformers, or PyTorch's varlen flash attention in bf16/fp16)
    efficient_drop_path: Switch = "auto"  # residual branches only for kept samples (CUDA)
    fused_adamw: Switch = "auto"  # torch.optim.AdamW(fused=True) (CUDA)
    sync_free_clip: Switch = "auto"  # per-parameter clipping without a host sync per parameter (everywhere)
    compile: Switch = False  # torch.compile of the transformer blocks


@dataclass
class EvalConfig:
    knn_train_path: str = ""  # labelled ImageFolder used as the kNN memory bank
    knn_val_path: str = ""  # labelled ImageFolder used as kNN queries
    knn_every_epochs: int = 0  # periodic kNN during training; 0 disables
    knn_k: int = 20  # neighbours that vote (the paper reports 20)
    knn_temperature: float = 0.07  # temperature of the kNN vote weights exp(similarity / T)
    image_size: int = 224  # evaluation resolution
    final_knn: bool = False  # after training: kNN of the teacher and of a random-init twin
    attention_images: int = 0  # after training: attention pictures of this many bundled photos
    attention_image_size: int = 224  # resolution of those pictures (the position embedding is interpolated)


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto (fsdp when world size > 1) | fsdp | ddp | none
    # recompute blocks' activations in the backward instead of keeping them: less memory, about a third more compute;
    # auto: only if micro-batches alone do not fit the device's memory, and only as many blocks as needed
    activation_checkpointing: Switch = False
    checkpointed_blocks: int = 0  # with activation_checkpointing=true: how many blocks recompute, spread evenly; 0: all


@dataclass
class GuardConfig:
    """The collapse guard (fastdino.guard), which reads the monitors; thresholds are fractions of ln K, K = out_dim."""

    action: str = "warn"  # on a collapse: warn (one line, training goes on) | stop (checkpoint, one line, exit code 3)
    # "near" as a fraction of ln K: uniform collapse at entropy >= (1 - band) ln K with KL <= band ln K, one-hot
    # collapse at entropy <= band ln K
    band: float = 0.05
    drift: float = 0.5  # drift toward uniform: the teacher entropy back up this fraction of ln K above its lowest
    patience: int = 10  # steps a mode, or the recovery from it, must hold before the guard says so


@dataclass
class ResumeFromConfig:
    """Continue a run of the reference main_dino.py (fastdino.reference_run) where output_dir holds no run."""

    path: str = ""  # a checkpoint.pth written by the reference main_dino.py, continued at its next epoch; '': none
    trust_reference_args: bool = False  # adopt the reference's args where they change the recipe (false: refuse)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    resume_from: ResumeFromConfig = field(default_factory=ResumeFromConfig)
    # where checkpoints, logs and pictures go (a run there is resumed); left unset with --config NAME.yaml: runs/NAME
    output_dir: str = "runs/dino"
    seed: int = 0  # seed of the weights, the augmentations and the data order
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    log_every: int = 10  # steps between log lines (and non-finite loss checks)
    monitor_every: int = 50  # steps between collapse monitors (teacher entropy, KL)
    checkpoint_every: int = 0  # steps between checkpoints; 0: epoch ends only
    saveckp_freq: int = 20  # keep a numbered copy every this many epochs; 0 disables
    resume: bool = True  # continue the run in output_dir; false: start over there (the run's own files are moved aside)


# One rule per key, checked whenever the key is set (after its type); keys absent here are checked for type only.
RULES: dict[str, Rule] = {
    "model.arch": choices("vit_tiny", "vit_small", "vit_base"),
    "model.patch_size": positive,
    "model.pos_embed_size": positive,
    "model.depth": optional(positive, "the architecture's own depth"),
    "model.out_dim": positive,
    "model.head_hidden_dim": positive,
    "model.head_bottleneck_dim": positive,
    "model.head_nlayers": positive,
    "model.drop_path_rate": between(0, 1, high_open=True),
    "model.attention": choices("auto", "xformers", "sdpa", "math"),
    "data.loader": choices("auto", "dali", "gpu_decode", "torch"),
    "data.global_crops_scale": area_fractions,
    "data.local_crops_scale": area_fractions,
    "data.local_crops_number": non_negative,
    "data.global_crop_size": positive,
    "data.local_crop_size": positive,
    "data.batch_size_per_gpu": positive,
    "data.micro_batches": or_auto(positive, "the fewest that fit the device's memory"),
    "data.num_workers": zero_means("load in the training process"),
    "optim.optimizer": choices("adamw", "sgd"),
    "optim.lr": positive,
    "optim.min_lr": non_negative,
    "optim.warmup_epochs": non_negative,
    "optim.weight_decay": non_negative,
    "optim.weight_decay_end": non_negative,
    "optim.clip_grad": zero_is_off,
    "optim.freeze_last_layer": non_negative,
    "optim.epochs": positive,
    "dino.momentum_teacher": unit_interval,
    "dino.warmup_teacher_temp": positive,
    "dino.teacher_temp": positive,
    "dino.warmup_teacher_temp_epochs": non_negative,
    "dino.student_temp": positive,
    "dino.center_momentum": unit_interval,
    "eval.knn_every_epochs": zero_is_off,
    "eval.knn_k": positive,
    "eval.knn_temperature": positive,
    "eval.image_size": positive,
    "eval.attention_images": zero_is_off,
    "eval.attention_image_size": positive,
    "distributed.strategy": choices("auto", "fsdp", "ddp", "none"),
    "distributed.checkpointed_blocks": zero_means("all blocks"),
    "guard.action": choices("warn", "stop"),
    "guard.band": between(0, 0.5, low_open=True, high_open=True),
    "guard.drift": between(0, 1, low_open=True),
    "guard.patience": zero_means("at the first reading that shows it"),
    "seed": non_negative,
    "device": choices("auto", "cuda", "cpu"),
    "precision": choices("auto", "bf16", "fp16", "fp32"),
    "log_every": positive,
    "monitor_every": zero_is_off,
    "checkpoint_every": zero_means("at epoch ends only"),
    "saveckp_freq": zero_is_off,
    "resume_from.path": Rule("must be an existing file (a checkpoint.pth of main_dino.py), or '' (none)",
                             lambda value: value == "" or Path(value).expanduser().is_file()),
}

def _valid_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(dotted_key: str) -> ConfigError:
    """A suggestion: the closest key of the same section, else the same name in another section, else the closest
    whole key (a misspelt section); with nothing close, the section's keys (or the sections) are listed."""
    keys = _valid_keys(Config())
    section, _, name = dotted_key.rpartition(".")
    in_section = {key.rpartition(".")[2]: key for key in keys if key.rpartition(".")[0] == section}
    anywhere = {key.rpartition(".")[2]: key for key in keys}
    if close := difflib.get_close_matches(name, list(in_section), n=1):
        return ConfigError(f"unknown config key '{dotted_key}': did you mean '{in_section[close[0]]}'?")
    if close := difflib.get_close_matches(name, list(anywhere), n=1, cutoff=0.8):
        return ConfigError(f"unknown config key '{dotted_key}': did you mean '{anywhere[close[0]]}'?")
    if not in_section and (close := difflib.get_close_matches(dotted_key, keys, n=1)):
        return ConfigError(f"unknown config key '{dotted_key}': did you mean '{close[0]}'?")
    if section and in_section:
        return ConfigError(f"unknown config key '{dotted_key}': the keys of {section} are "
                           f"{', '.join(in_section.values())}")
    top = dict.fromkeys(key.split(".")[0] + (".*" if "." in key else "") for key in keys)
    return ConfigError(f"unknown config key '{dotted_key}': valid keys are {', '.join(top)}")


def get_value(config: Config, dotted_key: str) -> Any:
    """`config.<dotted_key>`, e.g. get_value(config, "optim.lr")."""
    value: Any = config
    for name in dotted_key.split("."):
        value = getattr(value, name)
    return value


def _enforce(rule: Rule, key: str, value: Any) -> None:
    if problem := rule.problem(key, value):
        raise ConfigError(problem)


def set_value(config: Config, dotted_key: str, value: Any) -> None:
    """Set `config.<dotted_key>` to `value` after checking that the key exists, the type fits and its rule holds."""
    target: Any = config
    parts = dotted_key.split(".")
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown_key(dotted_key)
        if depth < len(parts) - 1:
            target = getattr(target, name)
    name = parts[-1]
    if dataclasses.is_dataclass(getattr(target, name)):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted_key}={show(value)}: expected a mapping of its keys "
                              f"(e.g. {dotted_key}: {{key: value}} in a file, {dotted_key}.key=value as an override)")
        for sub_key, sub_value in value.items():
            set_value(config, f"{dotted_key}.{sub_key}", sub_value)
        return
    annotation = typing.get_type_hints(type(target))[name]
    converted = convert(value, annotation)
    if converted is INVALID:
        raise ConfigError(f"{dotted_key}={show(value)}: expected {expected_type(annotation)}")
    if dotted_key in RULES:
        _enforce(RULES[dotted_key], dotted_key, converted)
    setattr(target, name, converted)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line out of a YAML error (whose own text spans several): what is wrong, and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML so that numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (for example optim.lr=0.001)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"{text}: the value is not valid YAML ({_yaml_problem(error)})") from None
    return key.strip(), value


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML recipe holds; ConfigError for a missing, unreadable or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        kind = {list: "a list", str: "a single string"}.get(type(content), f"a single {type(content).__name__}")
        raise ConfigError(f"config file {path} holds {kind}, not a mapping of settings (section: {{key: value}})")
    return content


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then the `key=value` overrides, in that order."""
    config = Config()
    if path is not None:
        config.output_dir = default_output_dir(path)
        for key, value in _read_config_file(Path(path)).items():
            set_value(config, str(key), value)
    for text in overrides:
        set_value(config, *parse_override(text))
    validate(config)
    return config


def default_output_dir(config_file: str | Path) -> str:
    """A recipe's own run folder under runs/ when it names none: never the working directory, which may hold a
    project, and one per recipe, so that two recipes do not meet in one folder."""
    return f"runs/{Path(config_file).stem}"


def knn_requested_by(config: Config) -> str:
    """The setting that asks for a kNN evaluation (`eval.final_knn=true` or `eval.knn_every_epochs=N`), or ""."""
    if config.eval.final_knn:
        return "eval.final_knn=true"
    if config.eval.knn_every_epochs:
        return f"eval.knn_every_epochs={config.eval.knn_every_epochs}"
    return ""


def validate(config: Config) -> None:
    """Consistency between keys, which no single key's rule can express; the message names both keys."""
    patch = config.model.patch_size
    multiple_of_patch = multiple_of(patch, "model.patch_size")
    knn = knn_requested_by(config)
    for key in ("model.pos_embed_size", "data.global_crop_size", "data.local_crop_size",
                *(("eval.image_size",) if knn else ())):
        _enforce(multiple_of_patch, key, get_value(config, key))
    if config.eval.attention_images:
        _enforce(Rule(f"must be >= model.patch_size ({patch})", lambda value: value >= patch),
                 "eval.attention_image_size", config.eval.attention_image_size)
    batch = config.data.batch_size_per_gpu
    _enforce(Rule(f"must divide data.batch_size_per_gpu ({batch}) into equal micro-batches",
                  lambda value: value == "auto" or batch % value == 0), "data.micro_batches", config.data.micro_batches)
    from fastdino.models.vit import ARCHITECTURES

    depth = config.model.depth or ARCHITECTURES[config.model.arch]["depth"]
    _enforce(Rule(f"must be <= the model's {depth} blocks", lambda value: value <= depth),
             "distributed.checkpointed_blocks", config.distributed.checkpointed_blocks)
    epochs = config.optim.epochs
    within_epochs = Rule(f"must be <= optim.epochs ({epochs})", lambda value: value <= epochs)
    for key in ("optim.warmup_epochs", "optim.freeze_last_layer", "dino.warmup_teacher_temp_epochs"):
        _enforce(within_epochs, key, get_value(config, key))
    if not config.monitor_every:
        _enforce(Rule("needs monitor_every > 0 (the guard reads the monitors)", lambda value: value == "warn"),
                 "guard.action", config.guard.action)
    _enforce(Rule("needs resume_from.path (the reference checkpoint whose args it adopts)",
                  lambda value: not value or bool(config.resume_from.path)),
             "resume_from.trust_reference_args", config.resume_from.trust_reference_args)
    if knn:
        for key in ("eval.knn_train_path", "eval.knn_val_path"):
            _enforce(Rule(f"must name a folder of class folders ({knn} evaluates on it)", bool), key,
                     get_value(config, key))


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
