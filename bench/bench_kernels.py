"""Time the fused DINO loss and the fused teacher EMA against their plain-PyTorch paths, in one process.

GPU run (the numbers that count):   python bench/bench_kernels.py
    DINO loss forward + backward at B=64 images, 2 global + 10 local crops, K=65536, fp32 and bf16 logits: the
    reference (eager) and the fused kernels. Teacher EMA over the parameters of ViT-S/8 and ViT-B/8 with their DINO
    heads: the reference per-parameter loop, torch._foreach_lerp_, the fused kernel. Medians of
    triton.testing.do_bench; each row printed as it is measured and the JSON rewritten after it
    (bench/results/kernels-<device>-<date>.json, `complete: false` until the last row). The reference under
    torch.compile (about a minute cold) is timed by bench/bench_compile.py, in run_gpu.sh's last stage.
CPU smoke run (CI):                 python bench/bench_kernels.py --smoke [--out FILE]
    Tiny sizes under TRITON_INTERPRET=1, timed with time.perf_counter; checks fused == reference; writes only --out.

Bandwidth floor (bytes that any implementation must move; achieved GB/s = these bytes / median time):
    loss: student logits read once + teacher logits read once + student gradient written once
          = 2 * S * K * bytes(student) + T * K * bytes(teacher), S = 12 * 64 student rows, T = 2 * 64 teacher rows;
    EMA:  teacher read + student read + teacher written = 3 * N * 4 bytes for N fp32 parameters.
The fraction of the floor = (floor bytes / peak HBM bandwidth) / median time (the theoretical ceiling);
fraction_of_copy_bandwidth = achieved GB/s / device-to-device copy GB/s measured in the same run (the practical one).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels run in the Triton interpreter on CPU; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, copy_bandwidth_gbs, dtype_name, figures_label, format_row, median_ms, new_report,
    peak_bandwidth_bytes_per_s, relative_error, write_report,
)
from fastdino.errors import report_usage_errors  # noqa: E402

VIT_DIMS = {"vit_small_p8": (384, 12), "vit_base_p8": (768, 12)}  # embed_dim, depth; ViT-B/8 and ViT-S/8 recipes
PATCH, IMG_TOKENS = 8, (224 // 8) ** 2 + 1
HEAD_OUT, HEAD_HIDDEN, HEAD_BOTTLENECK = 65536, 2048, 256


def vit_with_head_shapes(
    embed_dim: int, depth: int, out_dim: int = HEAD_OUT, hidden: int = HEAD_HIDDEN, bottleneck: int = HEAD_BOTTLENECK,
) -> list[tuple[int, ...]]:
    """Parameter shapes of a DINO ViT (patch 8, 224 px) plus its 3-layer DINO head with weight-normed last layer."""
    d = embed_dim
    shapes = [(1, 1, d), (1, IMG_TOKENS, d), (d, 3, PATCH, PATCH), (d,)]
    for _ in range(depth):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    shapes += [(hidden, d), (hidden,), (hidden, hidden), (hidden,),
               (bottleneck, hidden), (bottleneck,), (out_dim, 1), (out_dim, bottleneck)]
    return shapes


def make_timer(smoke: bool, device: torch.device) -> Callable[[Callable[[], object], list[torch.Tensor]], float]:
    """-> time_ms(fn, grad_to_none): do_bench median on GPU; one perf_counter-timed call on CPU (smoke only shows
    that the plumbing works: the interpreter is slow)."""
    if smoke:
        return lambda fn, grad_to_none: median_ms(fn, device, warmup=0, reps=1)
    import triton.testing

    def time_ms(fn, grad_to_none):
        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none or None,
                                       return_mode="median")
    return time_ms


# A gradient further than this from the eager reference's stops the run (relative error)
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def loss_function(variant: str) -> Callable:
    from fastdino.kernels import dino_loss_with_stats, dino_loss_with_stats_reference

    if variant == "reference_compiled":
        return torch.compile(dino_loss_with_stats_reference)
    return dino_loss_with_stats if variant == "fused" else dino_loss_with_stats_reference


def bench_loss(time_ms, device, smoke: bool, peak: float | None, variants: tuple[str, ...],
               add_row: Callable[[dict], None]) -> None:
    """DINO loss forward + backward per variant (the eager reference first: the others are compared with it), fp32
    and bf16 logits; each row handed to add_row as soon as it is timed. `grad_rel_error`: the variant's gradient
    against the eager reference's."""
    batch, n_crops, num_classes = (2, 4, 1000) if smoke else (64, 12, 65536)
    functions = {variant: loss_function(variant) for variant in variants}
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(n_crops * batch, num_classes, generator=generator).to(device, dtype).requires_grad_()
        teacher = torch.randn(2 * batch, num_classes, generator=generator).to(device, dtype)
        center = torch.randn(1, num_classes, generator=generator).to(device) * 0.1
        floor_bytes = 2 * student.numel() * student.element_size() + teacher.numel() * teacher.element_size()
        reference_grad = reference_ms = None
        for name, loss_fn in functions.items():
            def step(loss_fn=loss_fn):
                loss_fn(student, teacher, center, 0.04).loss.backward()
            student.grad = None
            step()  # compile / warm up, and keep the gradient for the check
            grad = student.grad.clone()
            reference_grad = grad if reference_grad is None else reference_grad
            error = relative_error(grad, reference_grad)
            if error > GRAD_TOLERANCE[dtype]:
                raise RuntimeError(f"{name} DINO loss gradient differs from the reference: relative error {error:.2e}")
            ms = time_ms(step, [student])
            reference_ms = ms if reference_ms is None else reference_ms
            add_row(_row("dino_loss_fwd_bwd", name, dtype, ms, reference_ms, floor_bytes, peak,
                         dict(batch=batch, n_crops=n_crops, num_classes=num_classes, grad_rel_error=error)))


def bench_ema(time_ms, device, smoke: bool, peak: float | None, add_row: Callable[[dict], None]) -> None:
    """Teacher EMA per implementation over ViT-S/8 and ViT-B/8 (+ head) shapes, checked against the reference loop;
    each row handed to add_row as soon as it is timed."""
    from fastdino.ema import TeacherEMA

    models = {"tiny": vit_with_head_shapes(16, 1, out_dim=64, hidden=32, bottleneck=8)} if smoke else {
        name: vit_with_head_shapes(dim, depth) for name, (dim, depth) in VIT_DIMS.items()}
    for model, shapes in models.items():
        generator = torch.Generator().manual_seed(0)
        student = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
        teacher = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
        ema = TeacherEMA.from_tensors(student, teacher, fused=True)
        floor_bytes = 3 * ema.numel * 4
        start = [t.clone() for t in teacher]
        results = {}
        for name in ("update_reference_loop", "update_foreach", "update_fused"):
            for t, s in zip(teacher, start):
                t.copy_(s)
            getattr(ema, name)(0.996)
            results[name] = [t.clone() for t in teacher]
        for a, b in zip(results["update_fused"], results["update_reference_loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        reference_ms = None
        for name in results:
            ms = time_ms(lambda name=name: getattr(ema, name)(0.996), [])
            reference_ms = ms if reference_ms is None else reference_ms
            add_row(_row("teacher_ema", name.removeprefix("update_"), torch.float32, ms, reference_ms, floor_bytes,
                         peak, dict(model=model, n_params=ema.numel, n_tensors=len(shapes))))


def _row(what, variant, dtype, ms, reference_ms, floor_bytes, peak, extra) -> dict:
    row = dict(what=what, variant=variant, dtype=dtype_name(dtype), median_ms=ms,
               speedup_vs_reference=reference_ms / ms, floor_bytes=floor_bytes,
               achieved_gb_per_s=floor_bytes / (ms * 1e-3) / 1e9, **extra)
    if peak:
        row["fraction_of_bandwidth_floor"] = floor_bytes / peak / (ms * 1e-3)
    return row


FIELDS = dict(what="", variant="", dtype="", model="", median_ms=".3f", speedup_vs_reference=".2f",
              achieved_gb_per_s=".1f", fraction_of_bandwidth_floor=".1%", fraction_of_copy_bandwidth=".1%")


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__, "tiny sizes on CPU under the Triton interpreter").parse_args(argv)
    device = bench_device(args.smoke)
    peak = None if args.smoke else peak_bandwidth_bytes_per_s(device)
    copy_gbs = None if args.smoke else copy_bandwidth_gbs(device)
    report = dict(new_report("kernels", device, args.smoke), complete=False,
                  peak_bandwidth_gb_per_s=peak / 1e9 if peak else None, copy_bandwidth_gb_per_s=copy_gbs, results=[])
    print(figures_label(report))

    def add_row(row: dict) -> None:  # appended, the file rewritten, then printed: a printed row is in the file
        if copy_gbs:
            row["fraction_of_copy_bandwidth"] = row["achieved_gb_per_s"] / copy_gbs
        report["results"].append(row)
        write_report(report, "kernels", args.out, args.smoke, quiet=True)
        print(format_row(report, row, FIELDS))

    time_ms = make_timer(args.smoke, device)
    bench_loss(time_ms, device, args.smoke, peak, ("reference", "fused"), add_row)
    bench_ema(time_ms, device, args.smoke, peak, add_row)
    report["complete"] = True
    write_report(report, "kernels", args.out, smoke=args.smoke)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
