"""Time attention forward + backward per backend (math, PyTorch SDPA, xformers) at DINO ViT shapes.

GPU run:   python bench/bench_attention.py
    bf16, batch 64, head dim 64, ViT-S/8 (6 heads) and ViT-B/8 (12 heads), at 785 tokens (224² global crop) and
    145 tokens (96² local crop); plus the multi-crop case 64 × (2 × 785 + 10 × 145) tokens run per resolution (one
    dense call per crop size) and packed (one block-diagonal call). Writes bench/results/attention-<device>-<date>.json.
CPU smoke: python bench/bench_attention.py --smoke [--out FILE]   (tiny sizes, fp32, seconds; writes only --out)

FLOPs counted: forward 4·B·heads·N²·head_dim (q kᵀ and the weighted sum of v), backward twice that.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, dtype_name, median_ms, new_report, peak_memory_gib, print_rows, relative_error,
    reset_peak_memory, write_report,
)
from fastdino.errors import report_usage_errors  # noqa: E402
from fastdino.models.attention import dense_attention, packed_attention, xformers_usable  # noqa: E402


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
    reset_peak_memory(device)
    ms = median_ms(step, device, warmup, reps)
    return ms, error, (out, peak_memory_gib(device))


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
                                 heads=heads, head_dim=head_dim, dtype=dtype_name(dtype),
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
                             heads=heads, head_dim=head_dim, dtype=dtype_name(dtype), median_ms=ms,
                             tflops=flops / ms / 1e9, peak_gib=peak, rel_error_vs_math=error))
    return rows


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__, "tiny sizes on the CPU (seconds)").parse_args(argv)
    device = bench_device(args.smoke)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    warmup, reps = (1, 2) if args.smoke else (5, 20)
    results = bench_dense(device, dtype, args.smoke, warmup, reps)
    results += bench_multicrop(device, dtype, args.smoke, warmup, reps)
    report = dict(new_report("attention", device, args.smoke), results=results)
    print_rows(report, results, dict(what="", model="", tokens="", layout="", backend="", median_ms=".3f",
                                     tflops=".2f", rel_error_vs_math=".1e"))
    write_report(report, "attention", args.out, args.smoke)
    return report


if __name__ == "__main__":
    main()
