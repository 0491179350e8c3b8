"""Peak memory and step time of one process in 1, 2 and 4 micro-batches and with every block recomputed, against
the memory plan's prediction (fastdino.memory_plan) for each.

GPU run:   python bench/bench_memory.py [--model vit_base_p8] [--batch 32]
    At the recipe's crops (2 x 224² + 10 x 96²), out_dim 65536, fastdino's fast paths; peak memory from
    torch.cuda.max_memory_allocated. Writes bench/results/memory-<device>-<date>.json.
CPU run:   python bench/bench_memory.py --cpu      (ViT-S/16 at 96 + 48 px crops, 4 blocks, fp32: about a minute)
    Peak memory as the CPU allocator counts it (bench.common.cpu_peak_bytes): CPU figures, for the ratios between
    the rows and the plan's error, not for GPU sizes.
CPU smoke: python bench/bench_memory.py --smoke  (tiny ViT, seconds; writes only --out)

Each row: micro-batches, recomputed blocks, step time (median), images/s, measured and planned peak, and the ratios
against the first row (the whole batch at once).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_parser, cpu_peak_bytes, names_from, new_report, peak_memory_gib, print_rows, reset_peak_memory, time_calls,
    training_state, write_jpegs, write_report,
)
from fastdino.config import RULES, load_config  # noqa: E402
from fastdino.errors import UsageError, report_usage_errors  # noqa: E402
from fastdino.memory_plan import planned_for  # noqa: E402
from fastdino.rules import positive  # noqa: E402
from fastdino.trainer import Trainer  # noqa: E402

ROWS = {  # name -> config overrides
    "whole_batch": [],
    "micro_batches_2": ["data.micro_batches=2"],
    "micro_batches_4": ["data.micro_batches=4"],
    "recompute_all_blocks": ["distributed.activation_checkpointing=true"],
}
SIZES = {  # --smoke / --cpu / GPU: overrides of the model and crops
    "smoke": ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.out_dim=1024",
              "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "data.global_crop_size=32",
              "data.local_crop_size=16", "data.local_crops_number=2"],
    "cpu": ["model.arch=vit_small", "model.depth=4", "model.patch_size=16", "model.out_dim=16384",
            "data.global_crop_size=96", "data.local_crop_size=48", "data.local_crops_number=10"],
}
FIELDS = dict(name="", micro_batches="", recomputed_blocks="", step_ms_median=".1f", images_per_s=".2f",
              peak_memory_gib=".3f", planned_peak_gib=".3f", peak_memory_vs_whole_batch=".2f",
              step_time_vs_whole_batch=".2f")


def measure(base: list[str], extra: list[str], device: torch.device, output_dir: Path, steps: int) -> dict:
    """One row: a fresh Trainer with `extra`, two steps (the optimizer state exists from the first), then the
    timed steps, and the peak of one more."""
    config = load_config(None, [*base, *extra, f"output_dir={output_dir}"])
    trainer = Trainer(config)
    data = config.data
    generator = torch.Generator().manual_seed(0)
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.local_crops_number
    crops = [torch.randn(data.batch_size_per_gpu, 3, size, size, generator=generator).to(device) for size in sizes]
    times = time_calls(lambda: trainer.train_step(crops), device, warmup=2, reps=steps)
    trainer.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        reset_peak_memory(device)
        trainer.train_step(crops)
        peak = peak_memory_gib(device)
    else:
        peak = cpu_peak_bytes(lambda: trainer.train_step(crops), [*training_state(trainer), *crops]) / 2**30
    median = statistics.median(times)
    row = dict(micro_batches=trainer.memory.micro_batches, recomputed_blocks=trainer.memory.recomputed_blocks,
               step_ms_median=median, images_per_s=data.batch_size_per_gpu * 1e3 / median, peak_memory_gib=peak,
               planned_peak_gib=planned_for(trainer).total / 2**30)
    return row


@report_usage_errors
def main(argv: list[str] | None = None) -> dict | None:
    parser = bench_parser(__doc__, "tiny ViT on the CPU (seconds)",
                          {"--batch": RULES["data.batch_size_per_gpu"], "--steps": positive, "--row": names_from(ROWS)})
    parser.add_argument("--cpu", action="store_true", help="the CPU figures: ViT-S/16 at small crops, fp32")
    parser.add_argument("--model", default="vit_base_p8", help="GPU run: the recipe under configs/ (default: "
                                                               "vit_base_p8)")
    parser.add_argument("--batch", type=int, default=None, help="per process (default: 32 GPU, 16 CPU, 4 smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps a row (default: 5 GPU, 3 CPU, 1 smoke)")
    parser.add_argument("--row", help="measure this row alone and print it as JSON (what each row's process runs)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "cpu" if args.cpu else None
    device = torch.device("cuda") if size is None else torch.device("cpu")
    if size is None and not torch.cuda.is_available():
        raise UsageError("no CUDA device: run with --cpu for the CPU figures or --smoke for the CPU check")
    batch = args.batch or {"smoke": 4, "cpu": 16, None: 32}[size]
    steps = args.steps or {"smoke": 1, "cpu": 3, None: 5}[size]
    if args.row:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            write_jpegs(workdir / "images", batch, (64, 64), classes=1)
            base = [*(_recipe(args.model) if size is None else SIZES[size]), f"data.path={workdir / 'images'}",
                    "data.loader=torch", "data.num_workers=0", f"data.batch_size_per_gpu={batch}", "optim.epochs=100",
                    "optim.warmup_epochs=0", "model.drop_path_rate=0.0", *(["device=cpu"] if size else [])]
            print(json.dumps(measure(base, ROWS[args.row], device, workdir / "run", steps)))
        return None
    report = new_report("memory", device, args.smoke)
    report.update(cpu_figures=device.type == "cpu", batch=batch, rows=[])
    for name in ROWS:  # each row in a process of its own: a Trainer freed in this one would blur the CPU count
        options = [*(["--smoke"] if args.smoke else ["--cpu"] if args.cpu else ["--model", args.model]),
                   "--batch", str(batch), "--steps", str(steps), "--row", name]
        done = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"row {name} failed:\n{done.stderr[-3000:]}")
        row = dict(name=name, **json.loads(done.stdout.strip().splitlines()[-1]))
        first = report["rows"][0] if report["rows"] else row
        row.update(peak_memory_vs_whole_batch=row["peak_memory_gib"] / first["peak_memory_gib"],
                   step_time_vs_whole_batch=row["step_ms_median"] / first["step_ms_median"])
        report["rows"].append(row)
        write_report(report, "memory", args.out, args.smoke, quiet=True)
    print_rows(report, report["rows"], FIELDS)
    write_report(report, "memory", args.out, args.smoke)
    return report


def _recipe(model: str) -> list[str]:
    """The settings of configs/<model>.yaml as overrides (its crops, head and schedules)."""
    path = REPO / "configs" / f"{model}.yaml"
    if not path.is_file():
        raise UsageError(f"--model={model}: no configs/{model}.yaml")
    config = load_config(path)
    return [f"model.arch={config.model.arch}", f"model.patch_size={config.model.patch_size}",
            f"model.out_dim={config.model.out_dim}", f"data.local_crops_number={config.data.local_crops_number}"]


if __name__ == "__main__":
    main()
