"""What ran: the machine, the library versions, the commit, and what every `auto` resolved to, recorded in the run
folder (run_folder.RUN_INFO) and said in the start-up lines; benchmarks record the same environment with their
results."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fastdino.builders import precision_name
from fastdino.memory_plan import device_memory_bytes
from fastdino.models.attention import packed_kernel, resolve_backend
from fastdino.models.vit import ARCHITECTURES

CHECKOUT = Path(__file__).resolve().parents[1]
LIBRARIES = ("fastdino", "torchvision", "triton", "timm", "numpy", "xformers", "nvidia-dali-cuda130")


def git_commit() -> str:
    """The commit of the checkout fastdino runs from, `+dirty` when tracked files differ from it; FASTDINO_GIT_COMMIT
    where the code is a copy without .git (a benchmark machine); "unknown" for an installed wheel."""
    if os.environ.get("FASTDINO_GIT_COMMIT"):
        return os.environ["FASTDINO_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=CHECKOUT, capture_output=True).returncode != 0
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def device_memory_gib(device: torch.device) -> float | None:
    """The device's memory (the host's RAM for the CPU), GiB."""
    memory = device_memory_bytes(device)
    return None if memory is None else round(memory / 2**30, 1)


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device and its memory, driver, library versions, date and commit."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in LIBRARIES:
        try:  # package metadata: importing xformers without its extension prints warnings
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record = dict(device=device_name(device), device_memory_gib=device_memory_gib(device), cpu_cores=os.cpu_count(),
                  versions=versions, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit())
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda
        record["driver"] = nvidia_driver()
    return record


def attention_path(backend: str, device: torch.device, dtype: torch.dtype, packed: bool, head_dim: int) -> str:
    """The attention kernel the training forward runs, in words."""
    if packed:
        kernel = packed_kernel(backend, device, dtype, head_dim)
        return {"xformers": "all crops packed, xformers block-diagonal attention",
                "varlen_flash": "all crops packed, PyTorch variable-length flash attention"}.get(
            kernel, f"all crops packed, {kernel.removesuffix('_mask')} attention with an explicit block-diagonal mask")
    return f"one forward per crop size, {resolve_backend(backend, device)} attention"


def describe(trainer: Any, started_from: str) -> dict[str, Any]:
    """RUN_INFO's content for this start of a run (`trainer`: a fastdino.trainer.Trainer, once built):
    `started_from` says whether it is fresh or continues."""
    config, fast = trainer.config, trainer.fast
    shape = ARCHITECTURES[config.model.arch]
    head_dim = shape["embed_dim"] // shape["num_heads"]
    total_batch = trainer.global_batch
    parameters = sum(param.numel() for param in trainer.student.parameters())
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "started_from": started_from,
        "environment": environment(trainer.device),
        "world_size": trainer.ctx.world_size,
        "strategy": trainer.strategy,
        "precision": precision_name(trainer.autocast_dtype),
        "attention": attention_path(config.model.attention, trainer.device, trainer.autocast_dtype, fast.packed,
                                    head_dim),
        "fast_paths": dict(fast.reasons),
        "images": trainer.loader.num_images,
        "classes": trainer.loader.num_classes,
        "steps_per_epoch": len(trainer.loader),
        "total_steps": trainer.schedules.total_steps,
        "total_batch": total_batch,
        "effective_lr": config.optim.lr * total_batch / 256,
        "micro_batches": trainer.memory.micro_batches,
        "recomputed_blocks": trainer.memory.recomputed_blocks,
        "memory": trainer.memory.reason,
        "student_parameters": parameters,
    }


def startup_lines(record: dict[str, Any]) -> list[str]:
    """What this run is made of, said once at its start: where and how it computes, and for each fast path whether
    it is on and why (so a slow run shows at once which path `auto` left off)."""
    env, world, classes = record["environment"], record["world_size"], record["classes"]
    processes = f"{world} process{'es' if world > 1 else ''}"
    memory = f", {env['device_memory_gib']} GiB" if env["device_memory_gib"] else ""
    lines = [
        f"{record['started_from']}; fastdino {env['versions']['fastdino']} at commit {env['git_commit']}, "
        f"torch {env['versions']['torch']}",
        f"running on {env['device']}{memory}, precision {record['precision']}, strategy {record['strategy']} "
        f"over {processes}",
        f"{record['images']:,} images{f' in {classes:,} class folders' if classes else ''}, "
        f"{record['steps_per_epoch']:,} steps per epoch of {record['total_batch']:,} "
        f"images ({record['total_steps']:,} steps in all), lr {record['effective_lr']:.3g} at this total batch, "
        f"{record['student_parameters']:,} student parameters",
        f"{record['total_batch'] // record['world_size']} images a process as {record['micro_batches']} micro-batch"
        f"{'es' if record['micro_batches'] > 1 else ''}, {record['recomputed_blocks']} blocks recomputed "
        f"({record['memory']})",
        f"attention: {record['attention']}; fast paths:",
    ]
    return lines + [f"  {name}: {reason}" for name, reason in record["fast_paths"].items()]
