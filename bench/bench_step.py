"""Full DINO training steps: reference-style vs fastdino, plus each fast path switched on alone.

GPU run:   python bench/bench_step.py [--models vit_small_p16,vit_small_p8,vit_base_p16,vit_base_p8] [--batch 64]
    For each model at the recipe's crops (2 x 224² + 10 x 96²), out_dim 65536: times `Trainer.train_step` on crops
    already on the GPU, one contestant at a time (each built, warmed up, timed and freed before the next): fastdino
    at --batch, reference-style from fastdino's batch down, fastdino again at reference-style's batch if that is
    smaller. A contestant that runs out of memory is a row (`out_of_memory`, the batch that failed) and is tried
    again at half the batch, down to --min-batch; the comparison is at the largest batch both fit
    (`comparison_batch`). Then every ablation (reference-style with one fast path switched on) at that batch; the
    compile path only when --paths names it (run_gpu.sh measures it in its last stage). Reports images/s, step time
    (median, p10-p90), peak memory, MFU against the measured bf16 matmul rate, the ratio fastdino / reference-style,
    and for every row the attention, loss, EMA and optimizer implementations that actually ran in its first step.
    With --loader, also the fastdino step fed by the real loader (DALI when installed) on generated ImageNet-size
    JPEGs. Writes bench/results/step-<device>-<date>.json, again after every row (`complete: false` until the end):
    a run cut off keeps what it measured.
CPU smoke: python bench/bench_step.py --smoke   (tiny ViT, fp32, Triton interpreter; checks that both
    contestants compute the same loss on the same batch; writes only --out)

Contestants (the same `Trainer.train_step`, configured by switches):
- reference-style: what facebookresearch/dino does: fp16 autocast with a grad scaler, one backbone forward per
  crop resolution, math attention, unfused loss, per-parameter clipping with a host sync per parameter,
  per-parameter EMA loop, and `loss.item()` every step.
- fastdino: bf16, packed crops with variable-length attention (when usable), efficient stochastic depth, fused loss,
  fused EMA, fused AdamW, sync-free clipping, no per-step host sync.

FLOPs per image (counted here, teacher forward included): student forward+backward = 3 x forward over all crops,
teacher = forward over the 2 global crops; forward of one crop = patch embedding + depth x (24 N D² + 4 N² D)
+ head (D·hidden + hidden² + hidden·bottleneck + bottleneck·out_dim, x2 for multiply-add).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if "--smoke" in sys.argv:  # the kernels run in the Triton interpreter on CPU; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    bench_device, bench_parser, crop_flops, figures_label, format_row, matmul_tflops, names_from, new_report,
    peak_memory_gib, reset_peak_memory, synchronize, time_calls, write_jpegs, write_report,
)
from fastdino.config import RULES, load_config  # noqa: E402
from fastdino.rules import existing_folder, non_negative, positive  # noqa: E402
from fastdino.errors import report_usage_errors  # noqa: E402
from fastdino.models import xformers_usable  # noqa: E402
from fastdino.models.attention import torch_varlen_usable  # noqa: E402
from fastdino.memory_plan import planned_for  # noqa: E402
from fastdino.models.vit import ARCHITECTURES  # noqa: E402
from fastdino.trainer import Trainer  # noqa: E402

MODELS = {
    "vit_small_p16": ("vit_small", 16, 384, 6),
    "vit_small_p8": ("vit_small", 8, 384, 6),
    "vit_base_p16": ("vit_base", 16, 768, 12),
    "vit_base_p8": ("vit_base", 8, 768, 12),
}
REFERENCE_STYLE = {
    "precision": "fp16", "model.attention": "math", "fast.fused_loss": False, "fast.fused_ema": False,
    "fast.packed": False, "fast.efficient_drop_path": False, "fast.fused_adamw": False,
    "fast.sync_free_clip": False, "fast.compile": False,
}
FAST_PATHS = {  # each fast path alone, as the ablation switches it on over reference-style
    "bf16": {"precision": "bf16"},
    "sdpa_attention": {"model.attention": "sdpa"},
    "xformers_attention": {"model.attention": "xformers"},
    "packed": {"fast.packed": True, "model.attention": "auto"},
    "efficient_drop_path": {"fast.efficient_drop_path": True},
    "fused_loss": {"fast.fused_loss": True},
    "fused_ema": {"fast.fused_ema": True},
    "fused_adamw": {"fast.fused_adamw": True},
    "sync_free_clip": {"fast.sync_free_clip": True},
    "compile": {"fast.compile": True},
}
# torch.compile costs about a minute cold on a GPU: the ablation leaves it out unless --paths names it
COMPILE_PATHS = ("compile",)
# fastdino with less memory (--memory-rows): images/s and peak memory against fastdino's own row, each with the
# memory plan's prediction
MEMORY_ROWS = {
    "micro_batches_2": {"data.micro_batches": 2},
    "micro_batches_4": {"data.micro_batches": 4},
    "recompute_all_blocks": {"distributed.activation_checkpointing": True},
}
# The row fields printed as each row is measured
ROW_FIELDS = dict(model="", name="", batch="", step_ms_median=".1f", images_per_s=".1f", mfu=".1%",
                  speedup_vs_reference_style=".2f", images_per_s_vs_fastdino=".2f", peak_memory_gib=".2f",
                  peak_memory_vs_fastdino=".2f", planned_peak_gib=".2f",
                  first_step_loss=".7f", error="", ran="")

# What a call of each function says ran, as (module, attribute, part, implementation). The attention functions also
# say whether they were handed an explicit block-diagonal mask: the path packed crops fall back to where
# variable-length attention does not run.
IMPLEMENTATIONS = (
    ("fastdino.models.attention", "_torch_varlen_attention", "attention", "varlen_flash"),
    ("xformers.ops", "memory_efficient_attention", "attention", "xformers"),
    ("fastdino.models.attention", "_sdpa_attention", "attention", "sdpa"),
    ("fastdino.models.attention", "_math_attention", "attention", "math"),
    ("fastdino.kernels", "dino_loss_with_stats", "loss", "fused_triton"),
    ("fastdino.kernels", "dino_loss_with_stats_reference", "loss", "reference"),
    ("fastdino.ema", "ema_update_", "ema", "fused_triton"),
    ("fastdino.ema", "ema_update_reference_", "ema", "flat_buffer_torch"),
    ("fastdino.ema", "TeacherEMA.update_reference_loop", "ema", "per_parameter_loop"),
    ("torch.optim.adam", "_fused_adam", "optimizer", "adamw_fused"),
    ("torch.optim.adam", "_multi_tensor_adam", "optimizer", "adamw_foreach"),
    ("torch.optim.adam", "_single_tensor_adam", "optimizer", "adamw_for_loop"),
)
PARTS = ("attention", "loss", "ema", "optimizer")


@contextlib.contextmanager
def recording_implementations() -> Iterator[dict[str, list[str]]]:
    """While open, each call of an IMPLEMENTATIONS function is noted (a module not imported ran nothing of its own).
    Yields {part: sorted implementations that ran}, filled in on exit: a switch says what was asked for, this says
    what ran, and a silent fallback shows as the difference."""
    seen: set[tuple[str, str]] = set()
    ran: dict[str, list[str]] = {}
    undo = []
    for module_name, attribute, part, name in IMPLEMENTATIONS:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        *path, function_name = attribute.split(".")
        owner = functools.reduce(getattr, path, module)
        original = getattr(owner, function_name)

        def noting(*args, _original=original, _part=part, _name=name, **kwargs):
            masked = _part == "attention" and len(args) > 3 and args[3] is not None
            seen.add((_part, f"{_name}_explicit_mask" if masked else _name))
            return _original(*args, **kwargs)

        setattr(owner, function_name, noting)
        undo.append((owner, function_name, original))
    try:
        yield ran
    finally:
        for owner, function_name, original in reversed(undo):
            setattr(owner, function_name, original)
        ran.update({part: sorted(name for kind, name in seen if kind == part) for part in PARTS})


def fastdino_settings(device: torch.device, compile_blocks: bool) -> dict:
    """Everything on that this device supports."""
    settings = {key: value for path in FAST_PATHS.values() for key, value in path.items()}
    settings["model.attention"] = "auto"
    settings["fast.packed"] = device.type == "cpu" or xformers_usable() or torch_varlen_usable(device.index or 0)
    settings["fast.compile"] = compile_blocks
    if device.type == "cpu":  # smoke: fp32 so that both contestants compute the same numbers
        settings["precision"] = "fp32"
    return settings


def step_flops_per_image(config) -> int:
    model, data = config.model, config.data
    dim = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[model.arch]
    depth = model.depth or 12
    head = (model.head_hidden_dim, model.head_bottleneck_dim, model.out_dim)
    tokens = lambda size: (size // model.patch_size) ** 2 + 1  # noqa: E731
    global_crop = crop_flops(tokens(data.global_crop_size), model.patch_size, dim, depth, *head)
    local_crop = crop_flops(tokens(data.local_crop_size), model.patch_size, dim, depth, *head)
    student = 3 * (2 * global_crop + data.local_crops_number * local_crop)
    return student + 2 * global_crop


def make_trainer(base: list[str], settings: dict, output_dir: Path) -> Trainer:
    overrides = base + [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                        for key, value in settings.items()] + [f"output_dir={output_dir}"]
    return Trainer(load_config(None, overrides))


def synthetic_crops(config, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, data = config.data.batch_size_per_gpu, config.data
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.local_crops_number
    return [torch.randn(batch, 3, s, s, generator=generator).to(device) for s in sizes]


def timed_step(trainer: Trainer) -> int:
    """The step every contestant runs at: the first of epoch 1, past the last layer's freeze (the full update)."""
    return trainer.schedules.steps_per_epoch


class Contestant:
    """A trainer with its switches; `step()` runs one training step on the fixed batch."""

    def __init__(self, name: str, trainer: Trainer, crops: list[torch.Tensor], sync_every_step: bool):
        self.name, self.trainer, self.crops, self.sync_every_step = name, trainer, crops, sync_every_step
        self.fast_paths = vars(trainer.fast)
        self.times: list[float] = []

    def step(self, read_loss: bool = False) -> float | None:
        """One step; the loss read back to the host every step (as the reference does) or when asked."""
        self.trainer.step = timed_step(self.trainer)  # the same schedule position every time
        output = self.trainer.train_step(self.crops)
        return output.loss.item() if self.sync_every_step or read_loss else None


def first_step(contestant: Contestant | ReferenceRepoContestant) -> tuple[float, dict[str, list[str]]]:
    """The untimed first step: its loss (every contestant starts from the same weights and batch, so they compare)
    and the implementations that ran in it."""
    with recording_implementations() as ran:
        loss = contestant.step(read_loss=True)
    return loss, ran


class ReferenceRepoContestant:
    """The reference's own modules, imported from a user's checkout of facebookresearch/dino (nothing of it is in
    fastdino): its ViT, DINOHead, MultiCropWrapper, DINOLoss, parameter groups, clipping and last-layer cancelling,
    stepped in the order of its train_one_epoch (fp16 autocast + GradScaler on CUDA, `loss.item()` every step,
    per-parameter EMA loop). Starts from `start`'s weights and uses its schedules, so losses compare one to one."""

    def __init__(self, repo: Path, start: Trainer, crops: list[torch.Tensor]):
        import torch.distributed as dist
        from torch import nn

        sys.path.insert(0, str(repo))
        import main_dino
        import utils as reference_utils
        import vision_transformer as reference_vits

        self.owns_process_group = not dist.is_initialized()
        if self.owns_process_group:  # its DINOLoss all-reduces the center
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("nccl" if crops[0].is_cuda else "gloo", rank=0, world_size=1)
        config, device = start.config, start.device
        self.name, self.crops, self.utils, self.config = "reference_repo", crops, reference_utils, config
        self.fast_paths = {"reference_repo": str(repo)}
        self.times: list[float] = []
        scheduled = start.schedules.at(timed_step(start))
        self.lr, self.weight_decay, self.momentum = scheduled.lr, scheduled.weight_decay, scheduled.teacher_momentum
        shape = dict(ARCHITECTURES[config.model.arch], **({"depth": config.model.depth} if config.model.depth else {}))

        def network(drop_path_rate: float, norm_last_layer: bool):
            backbone = reference_vits.VisionTransformer(
                img_size=[config.data.global_crop_size], patch_size=config.model.patch_size, mlp_ratio=4,
                qkv_bias=True, norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6), drop_path_rate=drop_path_rate,
                **shape)
            head = reference_vits.DINOHead(
                backbone.embed_dim, config.model.out_dim, norm_last_layer=norm_last_layer,
                nlayers=config.model.head_nlayers, hidden_dim=config.model.head_hidden_dim,
                bottleneck_dim=config.model.head_bottleneck_dim)
            return reference_utils.MultiCropWrapper(backbone, head).to(device)

        self.student = network(config.model.drop_path_rate, config.model.norm_last_layer)
        self.teacher = network(0.0, True)
        self.student.load_state_dict(start.student.state_dict())
        self.teacher.load_state_dict(start.teacher.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        self.optimizer = torch.optim.AdamW(reference_utils.get_params_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.loss = main_dino.DINOLoss(
            config.model.out_dim, 2 + config.data.local_crops_number, config.dino.warmup_teacher_temp,
            config.dino.teacher_temp, config.dino.warmup_teacher_temp_epochs, config.optim.epochs).to(device)

    def step(self, read_loss: bool = True) -> float:
        """One step in the order of the reference's train_one_epoch, which reads the loss back every step."""
        epoch, optim = 1, self.config.optim
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr
            if index == 0:
                group["weight_decay"] = self.weight_decay
        with torch.autocast(self.crops[0].device.type, dtype=torch.float16, enabled=self.scaler is not None):
            teacher_output = self.teacher(self.crops[:2])
            student_output = self.student(self.crops)
            loss = self.loss(student_output, teacher_output, epoch)
        value = loss.item()
        self.optimizer.zero_grad()
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.utils.clip_gradients(self.student, optim.clip_grad)
        self.utils.cancel_gradients_last_layer(epoch, self.student, optim.freeze_last_layer)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            for student_param, teacher_param in zip(self.student.parameters(), self.teacher.parameters()):
                teacher_param.data.mul_(self.momentum).add_((1 - self.momentum) * student_param.detach().data)
        return value

    def close(self) -> None:
        """Leave no process group behind (the fastdino contestants run without one)."""
        import torch.distributed as dist

        if self.owns_process_group:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def summarize(contestant: Contestant | ReferenceRepoContestant, flops_per_image: int, batch: int,
              peak_tflops: float | None, memory: float | None) -> dict:
    times = sorted(contestant.times)
    median = statistics.median(times)
    row = {
        "name": contestant.name,
        "batch": batch,
        "step_ms_median": median,
        "step_ms_p10": times[len(times) // 10],
        "step_ms_p90": times[(len(times) * 9) // 10],
        "images_per_s": batch * 1e3 / median,
        "peak_memory_gib": memory,
        "fast_paths": contestant.fast_paths,
    }
    if peak_tflops:
        row["mfu"] = flops_per_image * batch / (median / 1e3) / (peak_tflops * 1e12)
    return row


def free_memory(device: torch.device) -> None:
    """Return what the last contestant held (an out-of-memory one too, once its exception is gone) to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelBench:
    """One model's rows in `results`. Every contestant is built, warmed up, timed and freed before the next is built,
    so that each is measured on its own and one that runs out of memory is a row, not a lost stage; `save()` after
    every row, `show(row)` prints it."""

    def __init__(self, name: str, args, device: torch.device, peak_tflops: float | None, workdir: Path,
                 results: dict, save: Callable[[], object], show: Callable[[dict], None]):
        arch, patch, _, _ = MODELS[name]
        self.name, self.args, self.device, self.peak_tflops, self.workdir = name, args, device, peak_tflops, workdir
        self.results, self.save, self.show = results, save, show
        self.base = [f"data.path={workdir / 'images'}", f"model.arch={arch}", f"model.patch_size={patch}",
                     f"data.local_crops_number={args.local_crops}", "data.loader=torch", "data.num_workers=0",
                     "optim.epochs=2", "optim.warmup_epochs=0", *args.override]
        self.initial: dict[str, dict] | None = None  # the weights every contestant starts from, on the host
        results.update(model=name, batch=args.batch, attempts=[])

    def settings(self, name: str) -> dict:
        """A contestant's switches: reference-style (fp32 on the CPU, where fp16 needs CUDA), fastdino, or
        reference-style with one fast path on."""
        reference = dict(REFERENCE_STYLE, precision="fp32") if self.device.type == "cpu" else REFERENCE_STYLE
        if name == "fastdino" or name in MEMORY_ROWS:
            return {**reference, **fastdino_settings(self.device, self.args.compile), **MEMORY_ROWS.get(name, {})}
        return {**reference, **FAST_PATHS.get(name, {})}

    def trainer(self, name: str, batch: int, extra: dict | None = None) -> Trainer:
        """A trainer with `name`'s switches at `batch`, from the same starting weights as every other."""
        settings = {**self.settings(name), "data.batch_size_per_gpu": batch, **(extra or {})}
        trainer = make_trainer(self.base, settings, self.workdir / f"{self.name}-{name}-{batch}")
        if self.initial is None:
            self.initial = {part: {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}
                            for part, network in (("student", trainer.student), ("teacher", trainer.teacher))}
            self.results["flops_per_image"] = step_flops_per_image(trainer.config)
        trainer.student.load_state_dict(self.initial["student"])
        trainer.teacher.load_state_dict(self.initial["teacher"])
        return trainer

    def time(self, name: str, batch: int) -> dict:
        """Build, run the first step (its loss and implementations), warm up and time `name` at `batch`."""
        if name == "reference_repo":  # the reference's own modules, from reference-style's weights and schedules
            start = self.trainer("reference_style", batch)
            crops = synthetic_crops(start.config, self.device)
            contestant = ReferenceRepoContestant(self.args.reference_repo, start, crops)
            del start
        else:
            trainer = self.trainer(name, batch)
            planned = planned_for(trainer).total / 2**30
            contestant = Contestant(name, trainer, synthetic_crops(trainer.config, self.device),
                                    sync_every_step=name not in ("fastdino", *MEMORY_ROWS))
            del trainer
        try:
            reset_peak_memory(self.device)
            loss, ran = first_step(contestant)
            contestant.times = time_calls(contestant.step, self.device, self.args.warmup, self.args.steps)
            memory = peak_memory_gib(self.device)
        finally:
            if isinstance(contestant, ReferenceRepoContestant):
                contestant.close()
        row = summarize(contestant, self.results["flops_per_image"], batch, self.peak_tflops, memory)
        if name != "reference_repo":
            row["planned_peak_gib"] = planned
        return dict(row, first_step_loss=loss, ran=ran)

    def measure(self, name: str, batch: int, floor: int) -> dict:
        """`name` at `batch`, and while it runs out of memory, at half the batch down to `floor`. Every attempt is a
        row of `attempts` (an out-of-memory one names the batch that failed), saved and shown at once. Returns the
        last attempt: the measured row, or an out-of-memory row when none fit."""
        while True:
            try:
                row = self.time(name, batch)
            except torch.OutOfMemoryError as error:
                row = {"name": name, "batch": batch, "out_of_memory": True,
                       "error": f"out of memory: {str(error).strip().splitlines()[0]}"}
            free_memory(self.device)
            self.results["attempts"].append(row)
            self.save()
            self.show(row)
            if not row.get("out_of_memory") or batch // 2 < floor:
                return row
            batch //= 2

    def compare(self) -> None:
        """fastdino at --batch, reference-style from fastdino's batch down, fastdino again at reference-style's if
        that is smaller: `contestants` holds the pair at the largest batch both fit (`comparison_batch`), with the
        speedup; without such a batch, whichever rows were measured, and `comparison_batch` null."""
        args = self.args
        fast = self.measure("fastdino", args.batch, args.min_batch)
        start = args.batch if fast.get("out_of_memory") else fast["batch"]
        reference = self.measure("reference_style", start, args.min_batch)
        if not fast.get("out_of_memory") and not reference.get("out_of_memory") and reference["batch"] < fast["batch"]:
            fast = self.measure("fastdino", reference["batch"], reference["batch"])
        pair = {name: row for name, row in (("reference_style", reference), ("fastdino", fast))
                if not row.get("out_of_memory")}
        comparable = len(pair) == 2 and fast["batch"] == reference["batch"]
        if comparable:
            fast["speedup_vs_reference_style"] = reference["step_ms_median"] / fast["step_ms_median"]
            self.show(dict(name="comparison", batch=fast["batch"],
                           speedup_vs_reference_style=fast["speedup_vs_reference_style"]))
        self.results.update(comparison_batch=fast["batch"] if comparable else None, contestants=pair,
                            first_step_loss={name: row["first_step_loss"] for name, row in pair.items()})
        self.save()
        if comparable and args.reference_repo:
            third = self.measure("reference_repo", fast["batch"], fast["batch"])
            if not third.get("out_of_memory"):
                pair["reference_repo"] = third
                self.results["first_step_loss"]["reference_repo"] = third["first_step_loss"]
            self.save()

    def ablation(self, paths: list[str], reference: dict) -> None:
        """Each fast path in `paths` alone over reference-style, at the batch of the `reference` row it is
        compared with (an out-of-memory one is a row too)."""
        self.results["ablation"] = []
        for path in paths:
            if path == "xformers_attention" and not xformers_usable():
                continue
            row = self.measure(path, reference["batch"], reference["batch"])
            if not row.get("out_of_memory"):
                row["speedup_vs_reference_style"] = reference["step_ms_median"] / row["step_ms_median"]
            self.results["ablation"].append(row)
            self.save()

    def memory_rows(self, fast: dict) -> None:
        """fastdino in micro-batches and with every block recomputed, at the batch of its `fast` row: what each
        costs in images/s and saves in peak memory (ratios against that row)."""
        self.results["memory_rows"] = []
        for name, extra in MEMORY_ROWS.items():
            if fast["batch"] % extra.get("data.micro_batches", 1):
                continue
            row = self.measure(name, fast["batch"], fast["batch"])
            if not row.get("out_of_memory"):
                row["images_per_s_vs_fastdino"] = row["images_per_s"] / fast["images_per_s"]
                if row["peak_memory_gib"] and fast["peak_memory_gib"]:
                    row["peak_memory_vs_fastdino"] = row["peak_memory_gib"] / fast["peak_memory_gib"]
            self.results["memory_rows"].append(row)
            self.save()

    def with_loader(self) -> None:
        """The fastdino step fed by the real loader (DALI when installed) from JPEG files, against synthetic crops."""
        args, device = self.args, self.device
        images = self.workdir / "loader_images"
        if not images.exists():
            write_jpegs(images, args.batch * (args.steps + args.warmup + 2), (500, 375), classes=1)
        trainer = self.trainer("fastdino", args.batch, {"data.loader": "auto", "data.num_workers": args.workers,
                                                        "data.path": images, "log_every": 10**6})
        times = []
        synchronize(device)
        last = time.perf_counter()
        for index, (crops, _) in enumerate(trainer.loader.epoch_iter(1)):  # the loader's time counts in each step
            if index == args.warmup + args.steps:
                break
            trainer.step = timed_step(trainer)
            trainer.train_step(crops)
            synchronize(device)
            now = time.perf_counter()
            if index >= args.warmup:
                times.append((now - last) * 1e3)
            last = now
        loader = "dali" if trainer.fast.dali else "gpu_decode" if trainer.fast.gpu_decode else "torch"
        self.results["with_loader"] = {
            "loader": loader, "steps": len(times), "step_ms_median": statistics.median(times) if times else None,
            "images_per_s": args.batch * 1e3 / statistics.median(times) if times else None}
        self.save()


def bench_model(name: str, args, device: torch.device, peak_tflops: float | None, workdir: Path, results: dict,
                save: Callable[[], object], show: Callable[[dict], None]) -> None:
    """Fill `results` for one model: the contestants, the ablation at their comparison batch, the loader."""
    bench = ModelBench(name, args, device, peak_tflops, workdir, results, save, show)
    bench.compare()
    reference = results["contestants"].get("reference_style")
    if args.paths and reference is not None:
        bench.ablation(args.paths, reference)
    fast = results["contestants"].get("fastdino")
    if args.memory_rows and fast is not None:
        bench.memory_rows(fast)
    if args.loader:
        bench.with_loader()


def parse_args(argv):
    rules = {"--models": names_from(MODELS), "--batch": RULES["data.batch_size_per_gpu"],
             "--min-batch": RULES["data.batch_size_per_gpu"], "--paths": names_from(FAST_PATHS),
             "--local-crops": RULES["data.local_crops_number"], "--steps": positive, "--warmup": non_negative,
             "--workers": RULES["data.num_workers"], "--reference-repo": existing_folder}
    parser = bench_parser(__doc__, "tiny ViT on the CPU, Triton interpreter (seconds)", rules)
    parser.add_argument("--models", help=f"default {','.join(MODELS)} (smoke: vit_small_p16, as a tiny ViT)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-batch", type=int, default=8,
                        help="out of memory: a contestant is tried at half the batch, down to this (smoke: 1)")
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--paths", help=f"the ablation's fast paths, default all but {', '.join(COMPILE_PATHS)} "
                                        "(smoke: none)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--loader", action="store_true", help="also time the step fed by the real loader")
    parser.add_argument("--memory-rows", action="store_true",
                        help=f"also fastdino as {', '.join(MEMORY_ROWS)}: images/s and peak memory")
    parser.add_argument("--compile", action="store_true", help="fastdino contestant with torch.compile'd blocks")
    parser.add_argument("--reference-repo", type=Path,
                        help="a checkout of facebookresearch/dino: its own modules as a third contestant")
    parser.add_argument("override", nargs="*", help="extra config overrides for every contestant")
    args = parser.parse_args(argv)
    args.models = args.models or ("vit_small_p16" if args.smoke else ",".join(MODELS))
    if args.smoke:  # the model names stay as labels; every model is the same tiny ViT
        args.batch, args.min_batch, args.local_crops, args.steps, args.warmup = 2, 1, 2, 2, 0
        args.override = ["model.arch=vit_tiny", "model.depth=1", "model.out_dim=256", "model.head_hidden_dim=64",
                         "model.head_bottleneck_dim=32", "data.global_crop_size=32", "data.local_crop_size=16",
                         "model.patch_size=16", "model.drop_path_rate=0.0", *args.override]
    default_paths = [] if args.smoke else [path for path in FAST_PATHS if path not in COMPILE_PATHS]
    args.paths = (args.paths.split(",") if args.paths else default_paths) if args.ablation else []
    return args


@report_usage_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = bench_device(args.smoke)
    report = new_report("step", device, args.smoke)
    report.update(bf16_matmul_tflops=None if args.smoke else matmul_tflops(device), complete=False, models=[])
    print(figures_label(report))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_jpegs(workdir / "images", args.batch, (64, 64), classes=1)
        for name in args.models.split(","):
            report["models"].append({})
            bench_model(name, args, device, report["bf16_matmul_tflops"], workdir, report["models"][-1],
                        save=lambda: write_report(report, "step", args.out, args.smoke, quiet=True),
                        show=lambda row, name=name: print(format_row(report, dict(row, model=name), ROW_FIELDS)))
    report["complete"] = True
    write_report(report, "step", args.out, args.smoke)
    return report


if __name__ == "__main__":
    main()
