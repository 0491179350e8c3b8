"""Images/s of full DINO multi-crop batches: the DALI pipeline against the torchvision CPU-worker loader, and the CPU
paths per worker core.

Both loaders read the same freshly written JPEGs (ImageNet-like: about 500x375, quality 90) on the same machine and
hand over batches on the training device (CUDA when present: the torchvision batches are copied there, as training
does).

CPU paths (`results["cpu_paths"]`): images/s per worker core of MultiCropLoader batches, in one run, at 1 worker and at
all cores, on ImageNet-like JPEGs and on large photos (3000x2000), for the reference's recipe as it computes it
(float32 from PIL, `DataAugmentationDINO`), fastdino's fast path (`FastMultiCrop`: uint8 out, torch's uint8 resize
and PIL's colour ops called directly, JPEG draft decoding) and each of its ways alone or left out (the ablation); each
path's ratio to the reference of the same run and size. The machine's load average is recorded before and after.

    python bench/bench_data.py --num-images 4000 --local-crops 10 --batch-size 64 --workers 16 --threads 16
    python bench/bench_data.py --skip-dali --skip-torchvision   # the CPU paths alone (CPU figures)
    python bench/bench_data.py --smoke [--out FILE_OR_DIR]   # seconds; writes only --out

Writes bench/results/data-<device>-<date>.json (device, versions, date, git commit, settings, results).
Unlike the other benchmarks it runs on the CPU too (no CUDA: batches stay on the CPU, DALI runs its CPU pipeline).
"""
from __future__ import annotations

import gc
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
from fastdino.data.fast_augment import FastMultiCrop, normalize_crops  # noqa: E402
from fastdino.data.recipe import MultiCropRecipe  # noqa: E402
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


class _UintOut:
    """The reference's transforms with ToTensor + Normalize replaced by PILToTensor: uint8 out, nothing else."""

    def __init__(self, recipe: MultiCropRecipe):
        from torchvision import transforms
        reference = DataAugmentationDINO(recipe=recipe)
        self.slot_transforms = [transforms.Compose([*t.transforms[:-2], transforms.PILToTensor()])
                                for t in reference.slot_transforms]

    def __call__(self, image):
        return [transform(image) for transform in self.slot_transforms]


class _FloatOut:
    """The fast path with its crops normalized to float32 in the worker, as the reference hands them over."""

    def __init__(self, fast: FastMultiCrop):
        self.fast = fast

    def _float(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [crop[0] for crop in normalize_crops([crop[None] for crop in crops], self.fast.recipe)]

    def __call__(self, image):
        return self._float(self.fast(image))

    def from_file(self, path):
        return self._float(self.fast.from_file(path))


def cpu_paths(recipe: MultiCropRecipe) -> dict:
    """The CPU paths of the ablation: name -> transform."""
    return {
        "reference (float32, PIL)": DataAugmentationDINO(recipe=recipe),
        "uint8 out alone": _UintOut(recipe),
        "kernels alone (torch resize, direct PIL colour; float32 out)": _FloatOut(FastMultiCrop(recipe=recipe,
                                                                                                 draft=False)),
        "kernels + draft (float32 out)": _FloatOut(FastMultiCrop(recipe=recipe)),
        "fast without draft (uint8 out, kernels)": FastMultiCrop(recipe=recipe, draft=False),
        "fast (uint8 out, kernels, draft)": FastMultiCrop(recipe=recipe),
    }


def time_cpu_paths(root: Path, recipe: MultiCropRecipe, batch_size: int, steps: int, workers: list[int],
                   device: torch.device) -> list[dict]:
    """Per worker count and path: images/s, images/s per worker core and the ratio to the reference (same run)."""
    rows = []
    for count in workers:
        reference = None
        for name, transform in cpu_paths(recipe).items():
            # not persistent: the workers end with the epoch's iterator, before the next path's workers start
            loader = MultiCropLoader(ImageFolderDataset(root, transform), batch_size, num_workers=count, seed=0,
                                     persistent_workers=False)
            epoch = iter(range(10**9))
            result = time_loader(lambda: loader.epoch_iter(next(epoch)), device, 1, steps)
            gc.collect()
            cores = max(1, count)
            reference = reference or result["images_per_s"]
            rows.append(dict(path=name, workers=count, **result, images_per_s_per_core=result["images_per_s"] / cores,
                             vs_reference_same_run=result["images_per_s"] / reference))
    return rows


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
    parser.add_argument("--skip-dali", action="store_true")
    parser.add_argument("--skip-cpu-paths", action="store_true")
    parser.add_argument("--cpu-images", type=int, nargs=2, default=(96, 24), metavar=("SMALL", "LARGE"),
                        help="timed images per CPU path at 500x375 and at 3000x2000 (after one untimed batch)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.batch_size, args.local_crops = 16, 4, 2
        args.global_size, args.local_size, args.workers, args.threads = 32, 16, 0, 1
        args.steps, args.warmup, args.image_size = 3, 1, (160, 120)
        args.cpu_images = (8, 4)

    from fastdino.data.dali import DALI_IMPORT_ERROR, DaliMultiCropLoader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    recipe = MultiCropRecipe(local_crops_number=args.local_crops, global_crop_size=args.global_size,
                             local_crop_size=args.local_size)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastdino-bench-data-") as scratch:
        root = args.data or Path(scratch)
        if args.data is None and not (args.skip_dali and args.skip_torchvision):
            started = time.perf_counter()
            write_jpegs(root, args.num_images, tuple(args.image_size))
            print(f"wrote {args.num_images} JPEGs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if args.skip_dali:
            results["dali"] = dict(skipped="--skip-dali")
        elif DALI_IMPORT_ERROR is None:
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
        if not args.skip_cpu_paths:
            load_before = os.getloadavg()
            sizes = [((160, 120), (480, 320)) if args.smoke else ((500, 375), (3000, 2000))][0]
            workers = [0] if args.smoke else sorted({1, os.cpu_count() or 1})
            results["cpu_paths"] = {}
            for size, images in zip(sizes, args.cpu_images):
                folder = Path(scratch) / f"cpu-{size[0]}x{size[1]}"
                batch = min(args.batch_size, images // 2 or 1)
                write_jpegs(folder, batch * (images // batch + 1), size)
                results["cpu_paths"][f"{size[0]}x{size[1]}"] = time_cpu_paths(folder, recipe, batch, images // batch,
                                                                            workers, device)
            results["load_average"] = dict(before=load_before, after=os.getloadavg())
    if "images_per_s" in results.get("dali", {}) and "images_per_s" in results.get("torchvision", {}):
        results["dali_speedup"] = results["dali"]["images_per_s"] / results["torchvision"]["images_per_s"]

    report = dict(
        new_report("data", device, args.smoke),
        settings=dict(num_images=args.num_images, image_size=list(args.image_size), jpeg_quality=90,
                      batch_size=args.batch_size, crops=f"2x{args.global_size}^2 + {args.local_crops}x"
                      f"{args.local_size}^2", steps=args.steps, warmup=args.warmup, cpu_count=os.cpu_count()),
        results=results)
    rows = [dict(loader=name, dali_speedup=results.get("dali_speedup") if name == "dali" else None, **result)
            for name, result in results.items() if name in ("dali", "torchvision")]
    print_rows(report, rows, dict(loader="", skipped="", images_per_s=".1f", images="", seconds=".2f", workers="",
                                  threads="", dali_speedup=".2f"))
    for size, size_rows in results.get("cpu_paths", {}).items():
        print(f"CPU paths on {size} JPEGs (load average {results['load_average']}):")
        for row in size_rows:  # a smoke run's ratios are left out, as every benchmark's
            ratio = "" if args.smoke else f"  vs reference (same run)={row['vs_reference_same_run']:.2f}"
            print(f"  {row['path']:<62} workers={row['workers']}  images/s={row['images_per_s']:.1f}  per core="
                  f"{row['images_per_s_per_core']:.1f}{ratio}")
    write_report(report, "data", args.out, args.smoke)
    return report


if __name__ == "__main__":
    main()
