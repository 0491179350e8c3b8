"""What a config needs from this machine, its data and its world size, checked before anything heavy starts.

train.py calls `check_runnable` right after the config loads: before the trainer is imported and before the output
folder exists, so a run that cannot work stops in seconds with one line (`ConfigError`) naming the setting and what
it needs. The trainer's resolve functions call the device checks below too, so a Trainer built directly (tests,
benchmarks) follows the same rules; the resolution of `auto` stays in the trainer.

What is refused, and why only that (each was tried on a CPU-only machine):
- device=cuda without a CUDA GPU.
- precision=fp16 off CUDA (autocast fp16 with a CUDA grad scaler); precision=bf16 on a GPU without bfloat16.
  bf16 on the CPU is allowed: PyTorch's CPU autocast runs it (slowly on CPUs without native bf16 instructions).
- fast.fused_loss=true where the Triton kernel cannot run (it needs CUDA, or the Triton interpreter).
- model.attention=xformers without CUDA or without a working xformers build.
- data.loader=dali without the nvidia.dali package.
- an output_dir holding a run's file names (config.yaml, log.jsonl, ...) that no fastdino run wrote (run_folder).
Allowed on the CPU because they run there: fast.fused_ema, fast.packed, fast.efficient_drop_path, fast.fused_adamw
(plain-PyTorch forms of the same computation), data.loader=gpu_decode (CPU decoding), DALI's CPU pipeline.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection

import torch

from fastdino.config import Config, ConfigError, knn_requested_by
from fastdino.errors import is_first_process
from fastdino.rules import Rule
from fastdino.data.datasets import DatasetError, find_images, ignored_loose_images
from fastdino.kernels.runtime import kernels_usable
from fastdino.run_folder import check_usable

log = logging.getLogger("fastdino")


def check_runnable(config: Config) -> None:
    """Every check of this module; ConfigError for the first setting this machine or its data cannot serve."""
    check_device(config)
    device = torch.device("cuda") if uses_cuda(config) else torch.device("cpu")
    check_precision(config, device)
    check_fast_paths(config, device)
    check_usable(config.output_dir)
    check_data(config)


def uses_cuda(config: Config) -> bool:
    """Whether the run trains on a CUDA GPU: device=auto takes one when present, device=cpu never does."""
    return config.device != "cpu" and torch.cuda.is_available()


def bf16_supported(device: torch.device) -> bool:
    """Whether autocast can run in bfloat16 on `device` (the CPU always can)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def _no_gpu_here(device: torch.device) -> str:
    return "none found" if not torch.cuda.is_available() else f"this run uses device={device.type}"


def check_device(config: Config) -> None:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda needs a CUDA GPU (none found); use device=auto or cpu")


def check_precision(config: Config, device: torch.device) -> None:
    """fp16 needs CUDA; bf16 needs a GPU that has it, or the CPU."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision=fp16 needs a CUDA GPU ({_no_gpu_here(device)}); use precision=bf16 or fp32")
    if config.precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"precision=bf16 needs a GPU with bfloat16 support ({torch.cuda.get_device_name(device)} "
                          "has none); use precision=fp16 or fp32")


def check_fast_paths(config: Config, device: torch.device) -> None:
    """Paths forced on (not `auto`) that cannot run here; `auto` never fails, it picks what runs."""
    if config.fast.fused_loss is True and not kernels_usable(device):
        raise ConfigError(f"fast.fused_loss=true needs a CUDA GPU ({_no_gpu_here(device)}); "
                          "use fast.fused_loss=auto or false")
    if config.model.attention == "xformers":
        _check_xformers(device)
    if config.data.loader == "dali":
        from fastdino.data.dali import DALI_IMPORT_ERROR

        if DALI_IMPORT_ERROR is not None:
            raise ConfigError(f"data.loader=dali needs the nvidia.dali package ({DALI_IMPORT_ERROR}); install "
                              "nvidia-dali-cuda130 or use data.loader=auto or torch")


def _check_xformers(device: torch.device) -> None:
    from fastdino.models.attention import xformers_usable

    if device.type != "cuda":
        raise ConfigError(f"model.attention=xformers needs a CUDA GPU ({_no_gpu_here(device)}); "
                          "use model.attention=auto, sdpa or math")
    if not xformers_usable():
        raise ConfigError("model.attention=xformers needs a working xformers build (its attention does not run on "
                          "this GPU); use model.attention=auto, sdpa or math")


def check_data(config: Config) -> None:
    """data.path holds at least one global batch of images; the kNN folders hold images when a kNN is asked for.
    Then names the images lying loose beside class folders, which are not used (the start-up lines count the
    used ones)."""
    data = config.data
    if not data.path:
        raise ConfigError("data.path is not set: pass data.path=/path/to/images")
    count = len(_images("data.path", data.path))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    needed = data.batch_size_per_gpu * world_size
    if needed > count:
        raise ConfigError(f"data.batch_size_per_gpu={data.batch_size_per_gpu}: one global batch (x {world_size} "
                          f"process{'es' if world_size > 1 else ''}) needs {needed} images, data.path={data.path} "
                          f"holds {count}; use a smaller batch")
    if knn_requested_by(config):
        train_count = len(_images("eval.knn_train_path", config.eval.knn_train_path))
        _images("eval.knn_val_path", config.eval.knn_val_path)
        if config.eval.knn_k > train_count:
            raise ConfigError(f"eval.knn_k={config.eval.knn_k}: must be <= the {train_count} images of "
                              f"eval.knn_train_path={config.eval.knn_train_path}")
    loose = ignored_loose_images(data.path)
    if loose and is_first_process():  # after every check: a refused setting stays one line
        log.warning("data.path=%s: %s image%s directly in it (%s%s) %s not used: beside class folders, only the "
                    "images inside them count; move them into a folder to train on them", data.path,
                    f"{len(loose):,}", "s" if len(loose) > 1 else "", ", ".join(loose[:3]),
                    ", ..." if len(loose) > 3 else "", "are" if len(loose) > 1 else "is")


def _images(key: str, path: str) -> list[tuple[str, int]]:
    """The images of the folder setting `key` names; ConfigError naming the key when there are none (and, for a
    relative path, the working directory it was read from)."""
    try:
        return find_images(path)[0]
    except DatasetError as error:
        where = "" if os.path.isabs(path) else f" (relative paths are read from the working directory, {os.getcwd()})"
        raise ConfigError(f"{key}={path}: {error}{where}") from None


def unnamed_knn_data(config: Config, named: Collection[str]) -> str:
    """A warning when the command line names the training images (`named`: the keys it set) but a kNN the config
    file asks for would evaluate on the file's own kNN folders, which the user did not name; "" otherwise."""
    knn = knn_requested_by(config)
    knn_keys = ("eval.knn_train_path", "eval.knn_val_path")
    if not knn or "data.path" not in named or any(key in named for key in knn_keys):
        return ""
    return (f"{knn} evaluates on eval.knn_train_path={config.eval.knn_train_path} and eval.knn_val_path="
            f"{config.eval.knn_val_path} from the config file, not on data.path={config.data.path}: pass labelled "
            "folders of your own data as eval.knn_train_path=... eval.knn_val_path=..., or turn the kNN off with "
            "eval.final_knn=false eval.knn_every_epochs=0")


def device_option() -> Rule:
    """The rule of a command's `--device`: cpu, or a CUDA device this machine has."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0

    def allows(name: str) -> bool:
        try:
            device = torch.device(name)
        except RuntimeError:
            return False
        return device.type == "cpu" or (device.type == "cuda" and (device.index or 0) < count)

    where = f"cuda or cuda:N with N < {count}" if count else "no CUDA GPU found"
    return Rule(f"must be cpu or a CUDA device ({where})", allows)
