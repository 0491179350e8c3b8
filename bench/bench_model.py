"""Time a DINO student step (forward + backward of backbone and head) over a multi-crop batch.

GPU run:   python bench/bench_model.py [--arch vit_small --patch-size 8 --batch 64 --compile]
    bf16 autocast, batch 64 × (2 × 224² + 10 × 96²) crops, drop path 0.1, DINO head with 65536 prototypes.
    Variants, all the same function:
      reference        per-resolution forward, plain math attention, plain drop path (what the reference does);
      per_resolution   per-resolution forward, attention 'auto' (xformers when usable), efficient drop path;
      packed           one packed forward for all crops (block-diagonal attention), efficient drop path;
      packed_compiled  packed + torch.compile of the blocks' MLP branch (with --compile).
    Reports median step time, images/s, peak memory and MFU: model FLOPs (counted below, as if nothing were
    dropped) per second over a measured dense bf16 matmul rate. Writes bench/results/model-<device>-<date>.json.
CPU smoke: python bench/bench_model.py --smoke [--out FILE]   (tiny ViT and crops, fp32, seconds)

FLOPs per crop of N tokens (patch p, width D, depth L, head hidden H, bottleneck b, prototypes K), forward:
    patch embedding 2·(N-1)·3p²·D + L·(24·N·D² + 4·N²·D) + head 2·(D·H + H·H + H·b + b·K);
backward = 2 × forward.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import bench_device, environment, median_ms, write_report  # noqa: E402

from fastdino.models import DINOHead, MultiCropWrapper, build_vit  # noqa: E402

VARIANTS = {  # name: (packed, attention, efficient drop path, compile)
    "reference": (False, "math", False, False),
    "per_resolution": (False, "auto", True, False),
    "packed": (True, "auto", True, False),
    "packed_compiled": (True, "auto", True, True),
}


def crop_flops(tokens: int, patch: int, dim: int, depth: int, hidden: int, bottleneck: int, prototypes: int) -> int:
    """Forward FLOPs of backbone + head for one crop of `tokens` tokens (CLS included)."""
    patch_embed = 2 * (tokens - 1) * 3 * patch**2 * dim
    blocks = depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim)
    head = 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)
    return patch_embed + blocks + head


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured dense matmul rate (TFLOP/s), the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * size**3 / ms / 1e9


def make_student(args, packed: bool, attention: str, efficient: bool, compile_blocks: bool) -> MultiCropWrapper:
    torch.manual_seed(0)
    backbone = build_vit(args.arch, patch_size=args.patch_size, img_size=args.global_size, drop_path_rate=0.1,
                         attention=attention, efficient_drop_path=efficient, compile_blocks=compile_blocks,
                         **args.model_overrides)
    head = DINOHead(backbone.embed_dim, args.out_dim, hidden_dim=args.head_hidden, bottleneck_dim=args.bottleneck)
    return MultiCropWrapper(backbone, head, packed=packed)


def bench_variant(name: str, args, device: torch.device, crops: list[torch.Tensor], flops: int) -> dict:
    packed, attention, efficient, compile_blocks = VARIANTS[name]
    student = make_student(args, packed, attention, efficient, compile_blocks).to(device).train()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step():
        student.zero_grad(set_to_none=True)
        with autocast:
            logits = student(crops)
        logits.float().square().mean().backward()

    row = dict(variant=name, packed=packed, attention=attention, efficient_drop_path=efficient,
               compile_blocks=compile_blocks)
    try:
        step()  # warm up (and compile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = median_ms(step, device, args.warmup, args.reps)
    except torch.cuda.OutOfMemoryError:
        return dict(row, error="out of memory")
    finally:
        del student
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(row, median_ms=ms, images_per_s=args.batch / ms * 1e3, peak_gib=peak,
                model_tflops_per_s=flops / ms / 1e9)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny ViT and crops on the CPU (seconds)")
    parser.add_argument("--out", type=Path, help="JSON path (default for GPU runs: bench/results/...)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time the packed_compiled variant")
    args = parser.parse_args(argv)
    args.global_size, args.local_size = 224, 96
    args.out_dim, args.head_hidden, args.bottleneck = 65536, 2048, 256
    args.model_overrides, args.warmup, args.reps = {}, 3, 10
    if args.smoke:
        args.arch, args.patch_size, args.batch, args.local_crops = "vit_tiny", 8, 2, 2
        args.global_size, args.local_size = 32, 16
        args.out_dim, args.head_hidden, args.bottleneck = 128, 64, 32
        args.model_overrides = dict(depth=2, embed_dim=48, num_heads=3)
        args.warmup, args.reps = 1, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.smoke)
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, generator=generator, device=device) for s in sizes]

    probe = make_student(args, False, "math", False, False)
    dims = dict(patch=args.patch_size, dim=probe.backbone.embed_dim, depth=len(probe.backbone.blocks),
                hidden=args.head_hidden, bottleneck=args.bottleneck, prototypes=args.out_dim)
    del probe
    flops = 3 * args.batch * sum(crop_flops((s // args.patch_size) ** 2 + 1, **dims) for s in sizes)

    variants = ["reference", "per_resolution", "packed"] + (["packed_compiled"] if args.compile else [])
    results = [bench_variant(name, args, device, crops, flops) for name in variants]
    peak_tflops = matmul_tflops(device, torch.float32 if args.smoke else torch.bfloat16, 256 if args.smoke else 8192)
    reference_ms = results[0].get("median_ms")
    for row in results:
        if "median_ms" in row:
            row["mfu"] = row["model_tflops_per_s"] / peak_tflops
            row["speedup_vs_reference"] = reference_ms / row["median_ms"] if reference_ms else None
    report = dict(environment(device), arch=args.arch, patch_size=args.patch_size, batch=args.batch,
                  crop_sizes=sizes, precision="fp32" if args.smoke else "bf16 autocast",
                  model_flops_per_step=flops, measured_matmul_tflops=peak_tflops, results=results)
    print(f"{args.arch}/{args.patch_size} batch {args.batch}, crops {sizes}, matmul {peak_tflops:.1f} TFLOP/s")
    for row in results:
        if "error" in row:
            print(f"{row['variant']:16s} {row['error']}")
            continue
        peak = f"{row['peak_gib']:6.1f} GiB" if row["peak_gib"] is not None else ""
        print(f"{row['variant']:16s} {row['median_ms']:9.1f} ms  {row['images_per_s']:8.1f} img/s  "
              f"MFU {row['mfu']:6.1%}  {peak}")
    write_report(report, args.out, "model", args.smoke)
    return report


if __name__ == "__main__":
    main()
