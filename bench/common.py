"""What every benchmark shares: the environment record, timing, the device's two ceilings, the JSON report.

Scripts run as files (`python bench/bench_step.py`); each puts the repository root on sys.path first so that
`bench.common` and `fastdino` import from the checkout.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdino.rules import CheckedArgumentParser, Rule
from fastdino.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def git_commit() -> str:
    """The commit the results belong to, `+dirty` when tracked files differ from it. The device machine gets a copy
    of the working tree without .git: there the caller passes the commit in FASTDINO_GIT_COMMIT."""
    if os.environ.get("FASTDINO_GIT_COMMIT"):
        return os.environ["FASTDINO_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True).returncode != 0
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def environment(device: torch.device) -> dict:
    """Device, driver, library versions, date and commit: recorded with every result file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "xformers", "nvidia-dali-cuda130", "torchvision", "timm"):
        try:  # package metadata: importing xformers without its extension prints warnings
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record = dict(device=device_name(device), versions=versions,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), git_commit=git_commit())
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda
        record["driver"] = _nvidia_driver()
    return record


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def new_report(name: str, device: torch.device, smoke: bool) -> dict:
    """The head every result file starts with: which benchmark, smoke or not, and the environment."""
    return dict(benchmark=name, smoke=smoke, **environment(device))


# --out: a JSON file to write, or a folder to write into
OUT_RULE = Rule("must be an existing folder or a .json file", lambda path: path.is_dir() or path.suffix == ".json")


def names_from(options: Collection[str]) -> Rule:
    """A comma-separated list of some of `options` (e.g. --models vit_small_p16,vit_base_p8)."""
    return Rule(f"must be a comma-separated list of {', '.join(options)}",
                lambda text: all(name in options for name in text.split(",")))


def bench_parser(description: str, smoke_help: str, rules: Mapping[str, Rule] | None = None) -> CheckedArgumentParser:
    """The two options every benchmark has: --smoke (CPU, tiny sizes, seconds) and --out. `rules` (option -> Rule)
    checks the script's own options as they are parsed: with `report_usage_errors` on the script's main, a bad one
    is one line and exit code 2."""
    parser = CheckedArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   rules={"--out": OUT_RULE, **(rules or {})})
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, help="JSON file or existing folder (default for GPU runs: bench/results/)")
    return parser


def bench_device(smoke: bool) -> torch.device:
    """CPU for smoke runs; a GPU run without CUDA stops with a hint."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device: run with --smoke for the CPU check")
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset_peak_memory; None on CPU (not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Wall time of each of `reps` calls of fn() in milliseconds, after `warmup` calls, GPU synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    return statistics.median(time_calls(fn, device, warmup, reps))


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192) -> float:
    """Measured dense matmul rate (TFLOP/s): the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * size**3 / ms / 1e9


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 1024) -> float:
    """Measured device-to-device copy rate (GB/s, read + write counted): the memory-bound ceiling."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device, warmup=3, reps=10)
    return 2 * source.numel() / ms / 1e6


def peak_bandwidth_bytes_per_s(device: torch.device) -> float | None:
    """Theoretical memory bandwidth from the memory clock and bus width (double data rate); None when unknown."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def crop_flops(tokens: int, patch: int, dim: int, depth: int, hidden: int, bottleneck: int, out_dim: int) -> int:
    """Forward FLOPs of ViT backbone + DINO head for one crop of `tokens` tokens (CLS included).

    Patch embedding 2·(N-1)·3p²·D + depth·(24·N·D² + 4·N²·D) + head 2·(D·H + H² + H·b + b·K); multiply-add = 2.
    """
    patch_embed = 2 * (tokens - 1) * 3 * patch**2 * dim
    blocks = depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim)
    head = 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)
    return patch_embed + blocks + head


def write_jpegs(root: Path, count: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> None:
    """`count` ImageNet-like JPEGs (quality 90) of smooth colour fields plus fine noise, in `classes` class folders
    under `root`: decoding them costs about what decoding photographs does. size = (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        texture = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# Figures that compare a time with another one or with a ceiling: printed only when they are measurements
RATIO_FIELDS = frozenset({"speedup_vs_reference", "speedup_vs_reference_style", "overhead_vs_single_device",
                          "dali_speedup", "mfu", "fraction_of_bandwidth_floor", "fraction_of_copy_bandwidth"})


def is_measurement(report: Mapping) -> bool:
    """Only a full-size run on a GPU measures speed. A smoke run (tiny sizes, Triton interpreter) or a CPU run only
    shows that the code runs and agrees with its reference: its timings must not be read as speeds."""
    return not report["smoke"] and not report["device"].startswith("cpu")


def figures_label(report: Mapping) -> str:
    """The line printed above a benchmark's figures: a measurement, or a functional check that is not one."""
    if is_measurement(report):
        return f"measurement on {report['device']} (commit {report['git_commit']}):"
    on_cpu = report["device"].startswith("cpu")
    where = ("CPU smoke" if on_cpu else "smoke") if report["smoke"] else "CPU"
    return (f"functional check ({where}), not a measurement: the times below only show that the code runs; "
            "speed ratios are left out")


def print_rows(report: Mapping, rows: list[dict], fields: dict[str, str]) -> None:
    """The figures label, then one console line per result row: `name=value` for each of `fields` (name -> format
    spec) the row has; ratio fields only when the report is a measurement."""
    print(figures_label(report))
    shown = {name: spec for name, spec in fields.items() if is_measurement(report) or name not in RATIO_FIELDS}
    for row in rows:
        print("  ".join(f"{name}={row[name]:{spec}}" for name, spec in shown.items() if row.get(name) is not None))


def write_report(report: dict, name: str, out: Path | None = None, smoke: bool = False) -> Path | None:
    """Write JSON to the file `out`, into the folder `out` as <name>-<device>-<date>.json, or (full runs only,
    no `out`) to bench/results/<name>-<device>-<date>.json. Smoke runs without `out` write nothing."""
    if out is None and smoke:
        return None
    if out is None or out.is_dir():
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
        out = (out or RESULTS) / f"{name}-{slug}-{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
