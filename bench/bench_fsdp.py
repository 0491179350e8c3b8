"""FSDP2 against the single-device step, and what sharding saves in memory, projected per world size.

GPU run:   python bench/bench_fsdp.py [--models vit_small_p16,vit_base_p8] [--batch 64]
    On one GPU (world size 1, NCCL), for each model at the recipe's crops (2 x 224² + 10 x 96², out_dim 65536):
    `Trainer.train_step` time and peak memory with distributed.strategy none, ddp and fsdp (the wrapping overhead
    at world size 1), and fsdp with activation checkpointing. Measured from the live tensors after a step: bytes
    per parameter of the training state (student fp32 weights + fp32 grads + 2 AdamW moments + fp32 teacher), which
    FSDP divides by the world size; projected per-GPU state at 1, 8, 64 GPUs, and the communication per step.
    Writes bench/results/fsdp-<device>-<date>.json.
CPU smoke: python bench/bench_fsdp.py --smoke   (gloo, world size 1, tiny ViT, seconds; writes only --out)

Communication per step and GPU (a projection from the parameter count P, not a measurement; ring collectives move
(N-1)/N of the buffer through every link):
    FSDP: student all-gather of bf16 params in forward and again in backward (2 x 2 B x P), teacher all-gather
          for its forward (2 B x P), reduce-scatter of fp32 gradients (4 B x P)  -> about 10 B x P.
          (Without packed crops the student runs two forwards, global and local, each gathering again: 14 B x P.)
    DDP:  all-reduce of fp32 gradients = reduce-scatter + all-gather (2 x 4 B x P) -> about 8 B x P.
    Links: NVLink about 450 GB/s per GPU within a node; between nodes 8 x 400 Gb/s InfiniBand per node,
    50 GB/s per GPU.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, names_from, new_report, peak_memory_gib, print_rows, reset_peak_memory, time_calls,
    write_jpegs, write_report,
)
from fastdino.config import RULES, load_config  # noqa: E402
from fastdino.errors import UsageError, report_usage_errors  # noqa: E402
from fastdino.distributed import DistributedContext, is_sharded, local_tensor  # noqa: E402
from fastdino.trainer import Trainer  # noqa: E402

MODELS = {"vit_small_p16": ("vit_small", 16), "vit_small_p8": ("vit_small", 8), "vit_base_p16": ("vit_base", 16),
          "vit_base_p8": ("vit_base", 8)}
VARIANTS = {  # name -> config overrides
    "single_device": ["distributed.strategy=none"],
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "fsdp_activation_checkpointing": ["distributed.strategy=fsdp", "distributed.activation_checkpointing=true"],
}
WORLD_SIZES = (1, 8, 64)
NVLINK_BYTES_PER_S = 450e9
INFINIBAND_BYTES_PER_S_PER_GPU = 8 * 400e9 / 8 / 8  # 8 x 400 Gb/s per node shared by 8 GPUs


def start_world_of_one(device: torch.device) -> DistributedContext:
    """A process group of one process (FSDP and DDP need one even alone)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistributedContext(0, 1, device)


def model_overrides(name: str, smoke: bool, batch: int, data: Path, out: Path) -> list[str]:
    if smoke:
        shape = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.out_dim=64",
                 "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "data.global_crop_size=16",
                 "data.local_crop_size=8", "data.local_crops_number=2", "device=cpu"]
    else:
        arch, patch = MODELS[name]
        shape = [f"model.arch={arch}", f"model.patch_size={patch}", "data.local_crops_number=10"]
    return [f"data.path={data}", f"output_dir={out}", "data.loader=torch", "data.num_workers=0",
            f"data.batch_size_per_gpu={batch}", "optim.warmup_epochs=0", "optim.epochs=1", "optim.freeze_last_layer=0",
            *shape]


def synthetic_crops(config, device: torch.device) -> list[torch.Tensor]:
    data = config.data
    generator = torch.Generator().manual_seed(0)
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.local_crops_number
    return [torch.randn(data.batch_size_per_gpu, 3, s, s, generator=generator).to(device) for s in sizes]


def training_state_bytes(trainer: Trainer) -> dict[str, int]:
    """Bytes this rank holds for each part of the training state, counted from the live tensors after a step."""
    def nbytes(tensors) -> int:
        return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)

    optimizer_tensors = [value for state in trainer.optimizer.state.values() for value in state.values()
                         if isinstance(value, torch.Tensor) and value.numel() > 1]
    return {
        "student_params": nbytes(trainer.student.parameters()),
        "student_grads": nbytes(p.grad for p in trainer.student.parameters() if p.grad is not None),
        "optimizer_moments": nbytes(optimizer_tensors),
        "teacher_params": nbytes(trainer.teacher.parameters()),
    }


def projection(parameters: int, bytes_per_parameter: float, root_unit: int, largest_block: int,
               step_ms: float) -> list[dict]:
    """Per-GPU state and communication at each world size (FSDP vs DDP); marked as a projection in the report."""
    rows = []
    for world in WORLD_SIZES:
        ring = (world - 1) / world
        fsdp_bytes, ddp_bytes = ring * 10 * parameters, ring * 8 * parameters
        link = NVLINK_BYTES_PER_S if world <= 8 else INFINIBAND_BYTES_PER_S_PER_GPU
        rows.append({
            "world_size": world,
            "fsdp_state_gib_per_gpu": bytes_per_parameter * parameters / world / 2**30,
            "fsdp_unsharded_bf16_working_gib": 2 * (root_unit + 2 * largest_block) / 2**30,
            "ddp_state_gib_per_gpu": bytes_per_parameter * parameters / 2**30,
            "fsdp_comm_gb_per_step": fsdp_bytes / 1e9,
            "ddp_comm_gb_per_step": ddp_bytes / 1e9,
            "link": "NVLink" if world <= 8 else "InfiniBand (inter-node)",
            "fsdp_comm_ms": fsdp_bytes / link * 1e3,
            "ddp_comm_ms": ddp_bytes / link * 1e3,
            "measured_single_gpu_step_ms": step_ms,
        })
    return rows


def unit_sizes(trainer: Trainer) -> tuple[int, int]:
    """Parameters in the FSDP root unit (everything outside the blocks) and in the largest block."""
    network = trainer.student
    blocks = [sum(p.numel() for p in block.parameters()) for block in network.backbone.blocks]
    total = sum(p.numel() for p in network.parameters())
    return total - sum(blocks), max(blocks)


def bench_model(name: str, args, device: torch.device, ctx: DistributedContext, data: Path) -> tuple[list, dict]:
    rows, memory = [], {}
    warmup, reps = (0, 1) if args.smoke else (3, 10)
    for variant, overrides in VARIANTS.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous variant's trainer is gone: give its cached blocks back
        with tempfile.TemporaryDirectory() as out:
            config = load_config(None, model_overrides(name, args.smoke, args.batch, data, Path(out)) + overrides)
            trainer = Trainer(config, ctx)
            crops = synthetic_crops(config, device)

            def step() -> None:
                trainer.step = 0  # the same schedule point every time (the schedules are only one epoch long)
                trainer.train_step(crops)

            try:
                reset_peak_memory(device)
                times = time_calls(step, device, warmup, reps)
            except torch.OutOfMemoryError:
                rows.append({"model": name, "variant": variant, "batch": args.batch, "error": "out of memory"})
                trainer = crops = None
                continue
            times.sort()
            row = {"model": name, "variant": variant, "batch": args.batch, "sharded": is_sharded(trainer.student),
                   "step_ms": times[len(times) // 2], "p10_ms": times[len(times) // 10],
                   "p90_ms": times[(9 * len(times)) // 10], "peak_gib": peak_memory_gib(device),
                   "img_per_s": args.batch / times[len(times) // 2] * 1e3}
            rows.append(row)
            if variant == "fsdp":
                parameters = sum(local_tensor(p).numel() for p in trainer.student.parameters())  # world 1: all
                state = training_state_bytes(trainer)
                root_unit, largest_block = unit_sizes(trainer)
                memory = {"parameters": parameters, "state_bytes": state,
                          "bytes_per_parameter": sum(state.values()) / parameters,
                          "root_unit_parameters": root_unit, "largest_block_parameters": largest_block}
            trainer = crops = None  # free this variant before the next one is built
    single = next((r["step_ms"] for r in rows if r["variant"] == "single_device" and "step_ms" in r), None)
    for row in rows:
        if single and "step_ms" in row:
            row["overhead_vs_single_device"] = row["step_ms"] / single
    if memory and single:
        memory["projection"] = projection(memory["parameters"], memory["bytes_per_parameter"],
                                          memory["root_unit_parameters"], memory["largest_block_parameters"], single)
    return rows, memory


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    rules = {"--models": names_from(MODELS), "--batch": RULES["data.batch_size_per_gpu"]}
    parser = bench_parser(__doc__, "CPU, gloo, world size 1, tiny ViT: checks the plumbing in seconds", rules)
    parser.add_argument("--models", default="vit_small_p16,vit_base_p8")
    parser.add_argument("--batch", type=int, default=None, help="images per GPU (default 64; smoke 2)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 64)
    device = bench_device(args.smoke)
    if dist.is_initialized():
        raise UsageError("run bench_fsdp.py as a plain process (it starts its own world of one)")
    ctx = start_world_of_one(device)
    report = new_report("fsdp", device, args.smoke)
    report.update(batch_per_gpu=args.batch, results=[], memory={})
    try:
        with tempfile.TemporaryDirectory() as images:
            data = Path(images)
            write_jpegs(data, count=max(args.batch, 8), size=(64, 64))
            models = ["tiny"] if args.smoke else args.models.split(",")
            for name in models:
                rows, memory = bench_model(name, args, device, ctx, data)
                report["results"] += rows
                report["memory"][name] = memory
                print_rows(report, rows, {"model": "s", "variant": "s", "step_ms": ".1f", "peak_gib": ".2f",
                                          "overhead_vs_single_device": ".3f", "error": "s"})
                if memory:
                    print(f"{name}: {memory['parameters'] / 1e6:.1f}M parameters, "
                          f"{memory['bytes_per_parameter']:.1f} bytes per parameter of training state")
    finally:
        dist.destroy_process_group()
    report["projection_note"] = (
        "PROJECTION, not a measurement: per-GPU state = measured bytes/parameter x parameters / world size; "
        "communication = ring collectives from the parameter count (FSDP ~10 B/param, DDP ~8 B/param per step) "
        "over NVLink 450 GB/s (<= 8 GPUs) or 50 GB/s per GPU InfiniBand (8 x 400 Gb/s per node)."
    )
    write_report(report, "fsdp", args.out, args.smoke)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    main()
