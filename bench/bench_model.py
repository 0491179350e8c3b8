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

FLOPs per crop: bench.common.crop_flops (patch embedding + blocks + head, forward); backward = 2 × forward.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, crop_flops, matmul_tflops, median_ms, new_report, peak_memory_gib, print_rows,
    reset_peak_memory, write_report,
)
from fastdino.config import RULES  # noqa: E402
from fastdino.rules import positive  # noqa: E402
from fastdino.errors import report_usage_errors  # noqa: E402
from fastdino.models import DINOHead, MultiCropWrapper, build_vit  # noqa: E402

VARIANTS = {  # name: (packed, attention, efficient drop path, compile)
    "reference": (False, "math", False, False),
    "per_resolution": (False, "auto", True, False),
    "packed": (True, "auto", True, False),
    "packed_compiled": (True, "auto", True, True),
}


def make_student(args, packed: bool, attention: str, efficient: bool, compile_blocks: bool) -> MultiCropWrapper:
    torch.manual_seed(0)
    backbone = build_vit(args.arch, patch_size=args.patch_size, img_size=args.global_size, drop_path_rate=0.1,
                         attention=attention, efficient_drop_path=efficient, compile_blocks=compile_blocks,
                         **args.model_overrides)
    head = DINOHead(backbone.embed_dim, args.out_dim, hidden_dim=args.head_hidden, bottleneck_dim=args.bottleneck)
    return MultiCropWrapper(backbone, head, packed=packed)


def bench_variant(name: str, args, device: torch.device, crops: list[torch.Tensor], flops: int) -> dict:
    packed, attention, efficient, compile_blocks = VARIANTS[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous variant's network is gone: give its cached blocks back
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
        reset_peak_memory(device)
        ms = median_ms(step, device, args.warmup, args.reps)
    except torch.cuda.OutOfMemoryError:
        return dict(row, error="out of memory")
    return dict(row, median_ms=ms, images_per_s=args.batch / ms * 1e3, peak_gib=peak_memory_gib(device),
                model_tflops_per_s=flops / ms / 1e9)


def parse_args(argv):
    rules = {"--arch": RULES["model.arch"], "--patch-size": RULES["model.patch_size"], "--batch": positive,
             "--local-crops": RULES["data.local_crops_number"]}
    parser = bench_parser(__doc__, "tiny ViT and crops on the CPU (seconds)", rules)
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


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.smoke)
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, generator=generator, device=device) for s in sizes]

    probe = make_student(args, False, "math", False, False)
    dims = dict(patch=args.patch_size, dim=probe.backbone.embed_dim, depth=len(probe.backbone.blocks),
                hidden=args.head_hidden, bottleneck=args.bottleneck, out_dim=args.out_dim)
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
    report = dict(new_report("model", device, args.smoke), arch=args.arch, patch_size=args.patch_size, batch=args.batch,
                  crop_sizes=sizes, precision="fp32" if args.smoke else "bf16 autocast",
                  model_flops_per_step=flops, measured_matmul_tflops=peak_tflops, results=results)
    print(f"{args.arch}/{args.patch_size} batch {args.batch}, crops {sizes}")
    print_rows(report, results, dict(variant="", error="", median_ms=".1f", images_per_s=".1f", mfu=".1%",
                                     speedup_vs_reference=".2f", peak_gib=".1f"))
    print(f"matmul ceiling (the MFU denominator): {peak_tflops:.1f} TFLOP/s")
    write_report(report, "model", args.out, args.smoke)
    return report


if __name__ == "__main__":
    main()
