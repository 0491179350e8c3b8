"""Time attention forward + backward per backend (math, PyTorch SDPA, xformers) at DINO ViT shapes.

GPU run:   python bench/bench_attention.py
    bf16, batch 64, head dim 64, ViT-S/8 (6 heads) and ViT-B/8 (12 heads), at 785 tokens (224² global crop) and
    145 tokens (96² local crop); plus the multi-crop case 64 × (2 × 785 + 10 × 145) tokens run per resolution (one
    dense call per crop size) and packed (one block-diagonal call). Writes bench/results/attention-<device>-<date>.json.
CPU smoke: python bench/bench_attention.py --smoke [--out FILE]   (tiny sizes, fp32, seconds; writes only --out)

FLOPs counted: forward 4·B·heads·N²·head_dim (q kᵀ and the weighted sum of v), backward twice that.
This file also holds the small helpers the other model benchmark (bench_model.py) shares.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastdino.models.attention import dense_attention, packed_attention, xformers_usable  # noqa: E402


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    return torch.device("cuda")


def environment(device: torch.device) -> dict:
    """Device, library versions, date and commit recorded with every result file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("xformers", "timm", "triton"):
        try:  # from the package metadata: importing xformers without its extension prints warnings
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return dict(device=name, versions=versions, date=datetime.datetime.now().isoformat(timespec="seconds"),
                git_commit=git_commit())


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn() in milliseconds, synchronizing the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def write_report(report: dict, out: Path | None, name: str, smoke: bool) -> None:
    """Write JSON to `out`, or (full runs only) to bench/results/<name>-<device>-<date>.json."""
    if out is None and not smoke:
        slug = report["device"].lower().replace(" ", "-")
        out = REPO / "bench" / "results" / f"{name}-{slug}-{datetime.date.today():%Y%m%d}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def available_backends(device: torch.device) -> list[str]:
    backends = ["math", "sdpa"]
    if device.type == "cuda" and xformers_usable():
        backends.append("xformers")
    return backends


def _time_attention(call, shapes, device, dtype, warmup, reps, reference_out=None) -> tuple[float, float, object]:
    """Time forward + backward of `call(q, k, v)` on fresh random q/k/v of `shapes` [B, N, heads, head_dim]."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shapes, generator=generator, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))

    def step():
        out = call(q, k, v)
        out.backward(torch.ones_like(out))
        return out

    out = step().detach()
    error = relative_error(out, reference_out) if reference_out is not None else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, warmup, reps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return ms, error, (out, peak)


def bench_dense(device, dtype, smoke, warmup, reps) -> list[dict]:
    batch, head_dim = (2, 16) if smoke else (64, 64)
    models = {"vit_small_p8": 2 if smoke else 6, "vit_base_p8": 4 if smoke else 12}
    rows = []
    for model, heads in models.items():
        for tokens in ((65, 17) if smoke else (785, 145)):
            shape = (batch, tokens, heads, head_dim)
            flops = 3 * 4 * batch * heads * tokens**2 * head_dim
            reference = None
            for backend in available_backends(device):
                ms, error, (out, peak) = _time_attention(
                    lambda q, k, v, b=backend: dense_attention(q, k, v, backend=b), shape, device, dtype,
                    warmup, reps, reference)
                reference = out if reference is None else reference
                rows.append(dict(what="dense_fwd_bwd", model=model, backend=backend, batch=batch, tokens=tokens,
                                 heads=heads, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."),
                                 median_ms=ms, tflops=flops / ms / 1e9, peak_gib=peak, rel_error_vs_math=error))
    return rows


def bench_multicrop(device, dtype, smoke, warmup, reps) -> list[dict]:
    """All crops of a batch: one dense call per resolution, versus one packed block-diagonal call."""
    batch, head_dim, heads = (2, 16, 2) if smoke else (64, 64, 6)
    crops = [(2, 65), (4, 17)] if smoke else [(2, 785), (10, 145)]  # (number of crops, tokens per crop)
    seq_lens = [tokens for count, tokens in crops for _ in range(count * batch)]
    total = sum(seq_lens)
    flops = sum(3 * 4 * heads * n**2 * head_dim for n in seq_lens)

    def per_resolution(q, k, v, backend):
        outputs, start = [], 0
        for count, tokens in crops:
            rows = count * batch
            part = [t[:, start:start + rows * tokens].reshape(rows, tokens, heads, head_dim) for t in (q, k, v)]
            outputs.append(dense_attention(*part, backend=backend).reshape(1, rows * tokens, heads, head_dim))
            start += rows * tokens
        return torch.cat(outputs, dim=1)

    rows, reference = [], None
    for backend in available_backends(device):
        for layout, call in (("per_resolution", lambda q, k, v, b=backend: per_resolution(q, k, v, b)),
                             ("packed", lambda q, k, v, b=backend: packed_attention(q, k, v, seq_lens, backend=b))):
            ms, error, (out, peak) = _time_attention(call, (1, total, heads, head_dim), device, dtype, warmup, reps,
                                                     reference)
            reference = out if reference is None else reference
            rows.append(dict(what="multicrop_fwd_bwd", layout=layout, backend=backend, batch=batch, crops=crops,
                             heads=heads, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."), median_ms=ms,
                             tflops=flops / ms / 1e9, peak_gib=peak, rel_error_vs_math=error))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--out", type=Path, help="JSON path (default for GPU runs: bench/results/...)")
    args = parser.parse_args(argv)
    device = bench_device(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    warmup, reps = (1, 2) if args.smoke else (5, 20)
    results = bench_dense(device, dtype, args.smoke, warmup, reps)
    results += bench_multicrop(device, dtype, args.smoke, warmup, reps)
    report = dict(environment(device), results=results)
    for row in results:
        shape = f"{row['model']} N={row['tokens']}" if row["what"] == "dense_fwd_bwd" else row["layout"]
        print(f"{row['what']:18s} {shape:22s} {row['backend']:9s} {row['median_ms']:9.3f} ms "
              f"{row['tflops']:8.2f} TFLOP/s  err {row['rel_error_vs_math']:.1e}")
    write_report(report, args.out, "attention", args.smoke)
    return report


if __name__ == "__main__":
    main()
