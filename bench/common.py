"""What every benchmark shares: the environment record, timing, the device's two ceilings, the JSON report.

Scripts run as files (`python bench/bench_step.py`); each puts the repository root on sys.path first so that
`bench.common` and `fastdino` import from the checkout.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def environment(device: torch.device) -> dict:
    """Device, driver, library versions, date and commit: recorded with every result file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "xformers", "nvidia-dali-cuda130", "timm"):
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


def bench_device(smoke: bool) -> torch.device:
    """CPU for smoke runs; a GPU run without CUDA stops with a hint."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def write_report(report: dict, name: str, out: Path | None = None, smoke: bool = False) -> Path | None:
    """Write JSON to `out`, or (full runs only) to bench/results/<name>-<device>-<date>.json."""
    if out is None and not smoke:
        slug = report["device"].lower().replace(" ", "-")
        out = RESULTS / f"{name}-{slug}-{datetime.date.today():%Y%m%d}.json"
    if out is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
