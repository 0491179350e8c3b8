"""The torch.compile variants, together and last: each costs about a minute of compiling on a cold GPU machine, so
run_gpu.sh runs them in a stage of their own after everything that does not need them.

GPU run:   python bench/bench_compile.py          -> bench/results/compile-<device>-<date>.json
    1. `tests`: the GPU tests marked `compile` (compiled blocks against eager), as bench/gpu_tests.py records them;
    2. `step`: ViT-S/16 reference-style, then reference-style with `fast.compile` (the ablation's compile row,
       bench/bench_step.py), 3 warm-up and 10 timed steps each;
    3. `kernels`: the DINO loss reference eager and under torch.compile, fp32 and bf16 (bench/bench_kernels.py).
    The JSON is rewritten after every test and row (`complete: false` until the end), so a stage stopped at its
    budget keeps what finished; `bash bench/run_gpu.sh compile` runs it again alone.
CPU smoke: python bench/bench_compile.py --smoke   (writes only --out) the test skips (it needs CUDA); the step's
    compile row compiles the tiny ViT's blocks on the CPU (about 20 s); the compiled loss is left out (it would
    compile twice more).
Exit code: pytest's for the tests (the rows are written either way).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels run in the Triton interpreter on CPU; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import bench_kernels, bench_step, gpu_tests  # noqa: E402
from bench.common import (  # noqa: E402
    bench_device, bench_parser, figures_label, format_row, matmul_tflops, new_report, peak_bandwidth_bytes_per_s,
    write_jpegs, write_report,
)
from fastdino.errors import report_usage_errors  # noqa: E402

STEP_MODEL = "vit_small_p16"


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__, "CPU: the test skips, the step's compile row compiles on the CPU").parse_args(argv)
    device = bench_device(args.smoke)
    report = new_report("compile", device, args.smoke)
    report.update(complete=False, tests={}, step={}, kernels=[])

    def save() -> None:
        write_report(report, "compile", args.out, args.smoke, quiet=True)

    exit_code = gpu_tests.run_tests("gpu and compile", [], report["tests"], save)
    print(f"compile tests: {report['tests']['summary']}")

    print(figures_label(report))
    step_args = bench_step.parse_args(["--models", STEP_MODEL, "--steps", "10", "--warmup", "3", "--paths", "compile",
                                       *(["--smoke"] if args.smoke else [])])
    report["bf16_matmul_tflops"] = None if args.smoke else matmul_tflops(device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_jpegs(workdir / "images", step_args.batch, (64, 64), classes=1)
        step = bench_step.ModelBench(
            STEP_MODEL, step_args, device, report["bf16_matmul_tflops"], workdir, report["step"], save,
            lambda row: print(format_row(report, dict(row, model=STEP_MODEL), bench_step.ROW_FIELDS)))
        reference = step.measure("reference_style", step_args.batch, step_args.min_batch)
        if not reference.get("out_of_memory"):
            step.ablation(step_args.paths, reference)

    if args.smoke:
        report["kernels_skipped"] = "smoke: compiling the loss on the CPU takes longer than the rehearsal allows"
    else:
        def add_row(row: dict) -> None:
            report["kernels"].append(row)
            save()
            print(format_row(report, row, bench_kernels.FIELDS))

        bench_kernels.bench_loss(bench_kernels.make_timer(args.smoke, device), device, args.smoke,
                                 peak_bandwidth_bytes_per_s(device), ("reference", "reference_compiled"), add_row)
    report["complete"] = True
    write_report(report, "compile", args.out, args.smoke)
    if exit_code:
        raise SystemExit(exit_code)
    return report


if __name__ == "__main__":
    main()
