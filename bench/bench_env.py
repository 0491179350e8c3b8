"""What a GPU run stands on, checked before anything is timed: device, driver, versions, Triton's toolchain, and the
device's two ceilings.

GPU run:   python bench/bench_env.py          -> bench/results/env-<device>-<date>.json
CPU smoke: python bench/bench_env.py --smoke  (Triton interpreter, small ceiling probes; writes only --out)

Triton builds a small C launcher the first time a kernel runs on a GPU, which needs a C compiler and the Python
headers. This records both and then compiles and launches a one-line kernel, so that a machine that cannot run the
fused kernels says so here (exit code 1) rather than as a failure deep inside a benchmark. It then records which
attention kernels run here (PyTorch's variable-length flash attention, xformers, each SDPA backend), with the
exception's text for each that does not: packed crops fall back to an explicit mask without variable-length
attention, and that fallback must show. The ceilings, the device-to-device copy rate and the bf16 dense matmul rate
(bench.common), are what the other benchmarks' bandwidth fractions and MFU divide by. The JSON is rewritten after
every probe (`complete: false` until the last) and each finding is printed as it is made.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

if "--smoke" in sys.argv:  # the kernel runs in the Triton interpreter on CPU; set before it is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, copy_bandwidth_gbs, dtype_name, figures_label, matmul_tflops, new_report,
    peak_bandwidth_bytes_per_s, write_report,
)
from fastdino.errors import report_usage_errors  # noqa: E402
from fastdino.models.attention import varlen_attention_error, xformers_error  # noqa: E402

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)


def c_compiler() -> dict:
    """The compiler Triton would pick (CC, else cc, gcc, clang on PATH) and the first line of its --version."""
    path = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if path is None:
        return {"path": None, "version": None}
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"path": path, "version": None, "error": str(error)}
    return {"path": path, "version": version.strip().splitlines()[0] if version.strip() else None}


def python_headers() -> dict:
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"path": str(header), "exists": header.exists()}


def triton_launch(device: torch.device) -> dict:
    """Compile (on GPU: including the launcher) and run a one-line kernel; check what it computed."""
    started = time.perf_counter()
    try:
        x = torch.arange(1000, dtype=torch.float32, device=device)
        _add_one[(triton.cdiv(x.numel(), 256),)](x, x.numel(), BLOCK=256)
        ok = torch.equal(x.cpu(), torch.arange(1, 1001, dtype=torch.float32))
        error = None if ok else "wrong result"
    except Exception as caught:  # any failure here is the finding: record it, the report still gets written
        ok, error = False, f"{type(caught).__name__}: {caught}"
    return {"ok": ok, "seconds": time.perf_counter() - started, "error": error,
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}


def gpu_properties(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count}


def sdpa_backend_error(backend: SDPBackend, device: torch.device) -> str | None:
    """Why PyTorch's scaled_dot_product_attention cannot run `backend` here (forward and backward at the training
    dtype, head dim 64), with the reasons PyTorch warns of; None when it runs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 6, 145, 64, device=device, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
            return None
        except Exception as error:  # the finding: recorded with PyTorch's reasons
            reasons = "; ".join(str(warning.message).strip() for warning in caught)
            return f"{type(error).__name__}: {error}" + (f" ({reasons})" if reasons else "")


def attention_paths(device: torch.device) -> dict:
    """Each attention kernel the model may pick, usable here or not, with the exception's text when not: packed
    crops fall back to an explicit mask where variable-length attention does not run, and that must show."""
    errors = {"varlen_flash": varlen_attention_error(device.index or 0), "xformers": xformers_error()}
    errors.update({f"sdpa_{name}": sdpa_backend_error(backend, device) for name, backend in SDPA_BACKENDS.items()})
    return {name: {"usable": error is None, "error": error} for name, error in errors.items()}


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__, "CPU, Triton interpreter, small ceiling probes (seconds)").parse_args(argv)
    device = bench_device(args.smoke)
    report = new_report("env", device, args.smoke)
    report.update(complete=False, gpu=gpu_properties(device), c_compiler=c_compiler(), python_headers=python_headers())

    def save() -> None:  # after every probe: a stage cut off keeps what it found
        write_report(report, "env", args.out, args.smoke, quiet=True)

    save()
    print(f"device {report['device']} ({report['device_memory_gib']} GiB), driver {report.get('driver')}, "
          f"CUDA {report.get('cuda')}, versions {report['versions']}, commit {report['git_commit']}")
    print(f"C compiler {report['c_compiler']}, Python.h {report['python_headers']}")
    report["triton_launch"] = launch = triton_launch(device)
    save()
    print(f"Triton kernel launch: {'ok' if launch['ok'] else 'FAILED: ' + str(launch['error'])} "
          f"({launch['seconds']:.1f} s{', interpreter' if launch['interpreted'] else ''})")
    report["attention_paths"] = attention_paths(device)
    save()
    for name, path in report["attention_paths"].items():
        print(f"attention {name}: {'usable' if path['usable'] else 'not usable: ' + path['error']}")
    print(figures_label(report))
    report["copy_bandwidth_gb_per_s"] = copy_bandwidth_gbs(device, megabytes=16 if args.smoke else 1024)
    peak = None if args.smoke else peak_bandwidth_bytes_per_s(device)
    report["peak_bandwidth_gb_per_s"] = peak / 1e9 if peak else None
    save()
    print(f"copy {report['copy_bandwidth_gb_per_s']:.1f} GB/s, peak {report['peak_bandwidth_gb_per_s']} GB/s")
    matmul_dtype, matmul_size = (torch.float32, 256) if args.smoke else (torch.bfloat16, 8192)
    report["matmul"] = dict(dtype=dtype_name(matmul_dtype), size=matmul_size,
                            tflops=matmul_tflops(device, matmul_dtype, matmul_size))
    print(f"{report['matmul']['dtype']} matmul {report['matmul']['tflops']:.3g} TFLOP/s")
    report["complete"] = True
    write_report(report, "env", args.out, args.smoke)
    if not launch["ok"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
