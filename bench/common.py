"""What every benchmark shares: the environment record, timing, the device's two ceilings, the JSON report.

Scripts run as files (`python bench/bench_step.py`); each puts the repository root on sys.path first so that
`bench.common` and `fastdino` import from the checkout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdino import run_record
from fastdino.checkpoint import write_text_atomic
from fastdino.errors import UsageError
from fastdino.rules import CheckedArgumentParser, Rule

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def new_report(name: str, device: torch.device, smoke: bool) -> dict:
    """The head every result file starts with: which benchmark, smoke or not, and the environment: device and its
    memory, driver, library versions, date and commit, as a training run records them (fastdino.run_record), so
    that figures from an H100 and an H200 never mix."""
    return dict(benchmark=name, smoke=smoke, **run_record.environment(device))


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


def cpu_peak_bytes(step: Callable[[], object], live: list[torch.Tensor]) -> int:
    """The CPU peak of `step()`: the bytes of the `live` tensors when it starts (weights, optimizer state, the batch:
    blocks the profiler cannot see, as they were made before it started), plus the highest count of the allocator's
    live bytes during the step, as the profiler's memory events report it."""
    from torch.profiler import ProfilerActivity, profile

    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in live}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return sum(storages.values()) + max(event["args"]["Total Allocated"] for event in events
                                        if event.get("name") == "[memory]")


def training_state(trainer) -> list[torch.Tensor]:
    """Every tensor a Trainer keeps between steps: both networks' weights and buffers, the optimizer's state."""
    state = [value for moments in trainer.optimizer.state.values() for value in moments.values()
             if isinstance(value, torch.Tensor)]
    return [*trainer.student.parameters(), *trainer.teacher.parameters(), *trainer.student.buffers(),
            *trainer.teacher.buffers(), *state]


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
                          "dali_speedup", "mfu", "fraction_of_bandwidth_floor", "fraction_of_copy_bandwidth",
                          "images_per_s_vs_fastdino"})


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


def format_row(report: Mapping, row: Mapping, fields: Mapping[str, str]) -> str:
    """One console line for a result row: `name=value` for each of `fields` (name -> format spec) the row has;
    ratio fields only when the report is a measurement."""
    shown = {name: spec for name, spec in fields.items() if is_measurement(report) or name not in RATIO_FIELDS}
    return "  ".join(f"{name}={row[name]:{spec}}" for name, spec in shown.items() if row.get(name) is not None)


def print_rows(report: Mapping, rows: list[dict], fields: Mapping[str, str]) -> None:
    """The figures label, then one console line per result row (format_row)."""
    print(figures_label(report))
    for row in rows:
        print(format_row(report, row, fields))


# A command run after every result file is written: bench/run_gpu.sh packs its run folder there, so that a run cut
# off at any moment, even by SIGKILL, has returned every row and test finished before.
AFTER_WRITE = "BENCH_AFTER_WRITE"


def write_report(report: dict, name: str, out: Path | None = None, smoke: bool = False, quiet: bool = False
                 ) -> Path | None:
    """Write JSON to the file `out`, into the folder `out` as <name>-<device>-<date>.json, or (full runs only,
    no `out`) to bench/results/<name>-<device>-<date>.json. Smoke runs without `out` write nothing. The file is
    replaced atomically (a reader or a kill never meets half of it), then $BENCH_AFTER_WRITE runs. `quiet`: no
    "wrote" line (the rewrites after each row of a benchmark that writes as it goes)."""
    if out is None and smoke:
        return None
    if out is None or out.is_dir():
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
        out = (out or RESULTS) / f"{name}-{slug}-{datetime.date.today():%Y%m%d}.json"
    write_text_atomic(json.dumps(report, indent=2) + "\n", out)
    if os.environ.get(AFTER_WRITE):
        subprocess.run([os.environ[AFTER_WRITE]], check=False)
    if not quiet:
        print(f"wrote {out}")
    return out
