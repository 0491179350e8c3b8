"""Images/s of full DINO multi-crop batches: the DALI pipeline against the torchvision CPU-worker loader.

Both read the same freshly written JPEGs (ImageNet-like: about 500x375, quality 90) on the same machine and hand
over batches on the training device (CUDA when present: the torchvision batches are copied there, as training does).

    python bench/bench_data.py --num-images 4000 --local-crops 10 --batch-size 64 --workers 16 --threads 16
    python bench/bench_data.py --smoke [--out FILE_OR_DIR]   # seconds; writes only --out

Writes bench/results/data-<device>-<date>.json (device, versions, date, git commit, settings, results).
Unlike the other benchmarks it runs on the CPU too (no CUDA: batches stay on the CPU, DALI runs its CPU pipeline).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_parser, dtype_name, new_report, print_rows, synchronize, write_jpegs, write_report,
)
from fastdino.config import RULES  # noqa: E402
from fastdino.rules import existing_folder, non_negative, positive  # noqa: E402
from fastdino.data.augment import DataAugmentationDINO  # noqa: E402
from fastdino.data.datasets import ImageFolderDataset  # noqa: E402
from fastdino.data.torch_loader import MultiCropLoader  # noqa: E402
from fastdino.errors import report_usage_errors  # noqa: E402


def time_loader(epoch_batches, device: torch.device, warmup_steps: int, steps: int) -> dict:
    """Images/s over `steps` batches after `warmup_steps` (>= 1), each batch moved to `device` (synchronized).

    `epoch_batches()` starts the next epoch's iterator; epochs are chained when one is too short.
    """
    iterator = epoch_batches()
    images, start = 0, 0.0
    for step in range(max(1, warmup_steps) + steps):
        batch = next(iterator, None)
        if batch is None:
            iterator = epoch_batches()
            batch = next(iterator)
        crops, labels = batch
        crops = [crop.to(device, non_blocking=True) for crop in crops]
        synchronize(device)
        if step == max(1, warmup_steps) - 1:
            start = time.perf_counter()
        elif step >= warmup_steps:
            images += labels.numel()
    elapsed = time.perf_counter() - start
    return dict(images_per_s=images / elapsed, images=images, seconds=elapsed)


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    rules = {"--num-images": positive, "--batch-size": RULES["data.batch_size_per_gpu"],
             "--local-crops": RULES["data.local_crops_number"], "--global-size": RULES["data.global_crop_size"],
             "--local-size": RULES["data.local_crop_size"], "--workers": RULES["data.num_workers"],
             "--threads": positive, "--steps": positive, "--warmup": non_negative, "--image-size": positive,
             "--data": existing_folder}
    parser = bench_parser(__doc__, "tiny run: 16 images, 2+2 small crops (seconds)", rules)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="torchvision workers")
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="DALI CPU threads")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="DALI crop dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--data", type=Path, default=None, help="use this image folder instead of writing JPEGs")
    parser.add_argument("--skip-torchvision", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.batch_size, args.local_crops = 16, 4, 2
        args.global_size, args.local_size, args.workers, args.threads = 32, 16, 0, 1
        args.steps, args.warmup, args.image_size = 3, 1, (160, 120)

    from fastdino.data.dali import DALI_IMPORT_ERROR, DaliMultiCropLoader
    from fastdino.data.recipe import MultiCropRecipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    recipe = MultiCropRecipe(local_crops_number=args.local_crops, global_crop_size=args.global_size,
                             local_crop_size=args.local_size)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastdino-bench-data-") as scratch:
        root = args.data or Path(scratch)
        if args.data is None:
            started = time.perf_counter()
            write_jpegs(root, args.num_images, tuple(args.image_size))
            print(f"wrote {args.num_images} JPEGs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if DALI_IMPORT_ERROR is None:
            dali = DaliMultiCropLoader(root, args.batch_size, seed=0, device=device.type, dtype=dtype,
                                       num_threads=args.threads, recipe=recipe)
            epoch = iter(range(10**9))
            results["dali"] = time_loader(lambda: dali.epoch_iter(next(epoch)), device, args.warmup, args.steps)
            results["dali"].update(threads=args.threads, dtype=dtype_name(dtype))
        else:
            results["dali"] = dict(skipped=DALI_IMPORT_ERROR)
        if not args.skip_torchvision:
            dataset = ImageFolderDataset(root, DataAugmentationDINO(recipe=recipe))
            torch_loader = MultiCropLoader(dataset, args.batch_size, num_workers=args.workers, seed=0)
            epoch = iter(range(10**9))
            results["torchvision"] = time_loader(lambda: torch_loader.epoch_iter(next(epoch)), device,
                                                 args.warmup, args.steps)
            results["torchvision"].update(workers=args.workers, dtype="float32")
    if "images_per_s" in results.get("dali", {}) and "images_per_s" in results.get("torchvision", {}):
        results["dali_speedup"] = results["dali"]["images_per_s"] / results["torchvision"]["images_per_s"]

    report = dict(
        new_report("data", device, args.smoke),
        settings=dict(num_images=args.num_images, image_size=list(args.image_size), jpeg_quality=90,
                      batch_size=args.batch_size, crops=f"2x{args.global_size}^2 + {args.local_crops}x"
                      f"{args.local_size}^2", steps=args.steps, warmup=args.warmup, cpu_count=os.cpu_count()),
        results=results)
    rows = [dict(loader=name, dali_speedup=results.get("dali_speedup") if name == "dali" else None, **result)
            for name, result in results.items() if name != "dali_speedup"]
    print_rows(report, rows, dict(loader="", skipped="", images_per_s=".1f", images="", seconds=".2f", workers="",
                                  threads="", dali_speedup=".2f"))
    write_report(report, "data", args.out, args.smoke)
    return report


if __name__ == "__main__":
    main()
