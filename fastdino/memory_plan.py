"""The peak training memory of one process, predicted from a config before anything is allocated: what decides
whether a recipe's batch fits a GPU, how many micro-batches it needs, and whether blocks must be recomputed.

Parameter counts are exact (the networks are built on the meta device). The rest is arithmetic over the shapes, term
by term, each with the rule it follows:
- Static: student and teacher weights (fp32), gradients (fp32, all of them once a micro-batch has run, else those of
  the head, the first the backward writes), optimizer moments (AdamW 2, SGD 1, fp32), DDP's gradient buckets (one
  more copy of the gradients), autocast's low-precision copy of the student weights (kept for the step; FSDP's
  mixed precision casts the gathered parameters instead), all divided by the world size under FSDP, which adds the
  gathered root unit and two gathered blocks (the one computing and the one prefetched).
- Saved activations of one micro-batch, per token of every crop and per block (D the width, h the heads, N the
  tokens of the token's crop, c the bytes of the compute dtype), as PyTorch's autograd keeps them for these layers:
  the two layer norms keep their fp32 input (2 x 4D); the four linear layers their input in c (qkv D, proj D, fc1 D,
  fc2 4D); GELU its input (4D); attention keeps q, k, v (3D) and, by kernel,
  * math: the softmax output in fp32 and its low-precision copy for the second matmul, 4hN + chN (4hN in fp32),
  * flash / memory-efficient / variable-length (PyTorch's and xformers' kernels): the output (D) and an fp32
    logsumexp per head (4h), the kernels' documented saved state;
  so 8D + 14cD + (4 + c)hN (math, c < 4) or 8D + 15cD + 4h (flash kernels). A recomputed block keeps only its fp32
  input (4D) and is rebuilt in the backward when the blocks above it are freed. The final norm keeps 4D per token.
- Head and loss of one micro-batch, per row (a crop): the head MLP's saved inputs (c(D + 4·2048)), the student
  logits (cK) and the loss state: the plain loss keeps the fp32 log-softmax of every row (4K) and the teacher's
  probabilities and their sums (4 x 4K per image), the fused kernel the gradient it wrote (cK); the teacher logits
  (2 rows an image, cK); the weight-normed last layer's weight, c and a transient fp32 copy (K x bottleneck).
- The batch on the device: every crop of the process's batch (all micro-batches), float32.
The CPU check (tests/test_memory_plan.py) measures the allocator's peak with the profiler for several configs.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdino.builders import FastPaths, build_networks
from fastdino.config import Config, ConfigError, load_config
from fastdino.distributed import recomputed_indices
from fastdino.models.attention import packed_kernel, resolve_backend
from fastdino.errors import report_usage_errors
from fastdino.models.vit import ARCHITECTURES
from fastdino.rules import CheckedArgumentParser, Rule, positive

GiB = 2**30
HEAD_HIDDEN_ROWS = 4  # the head MLP's saved inputs per row, in units of its hidden width (two GELUs, two linears)


@dataclass
class Term:
    name: str
    bytes: float
    rule: str


@dataclass
class MemoryPlan:
    """The predicted peak of one process, term by term."""

    terms: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(term.bytes for term in self.terms)

    def table(self, memory_gib: float | None = None) -> str:
        width = max(len(term.name) for term in self.terms)
        lines = [f"{term.name:<{width}}  {term.bytes / GiB:9.2f} GiB  {term.rule}" for term in self.terms]
        lines.append(f"{'total':<{width}}  {self.total / GiB:9.2f} GiB")
        if memory_gib is not None:
            verdict = "fits" if self.total <= memory_gib * GiB else "does not fit"
            lines.append(f"{verdict} in {memory_gib:g} GiB")
        return "\n".join(lines)


@dataclass(frozen=True)
class Shapes:
    """What the arithmetic needs of a config's networks."""

    student: int  # parameters
    head: int
    root: int  # parameters outside the blocks (FSDP's root unit)
    block: int
    width: int
    heads: int
    depth: int
    bottleneck: int


def network_shapes(config: Config) -> Shapes:
    """Exact parameter counts of the config's student, built on the meta device (no memory)."""
    off = FastPaths(False, False, False, False, False, False, False, False, False)
    with torch.device("meta"):
        student, _ = build_networks(config, off)
    count = lambda module: sum(param.numel() for param in module.parameters())  # noqa: E731
    blocks = student.backbone.blocks
    return Shapes(student=count(student), head=count(student.head), root=count(student) - count(blocks),
                  block=count(blocks[0]), width=student.backbone.embed_dim, heads=blocks[0].attn.num_heads,
                  depth=len(blocks), bottleneck=config.model.head_bottleneck_dim)


def crop_tokens(config: Config) -> list[int]:
    """Tokens of each crop of one image (CLS included): 2 global, then the local crops."""
    patch, data = config.model.patch_size, config.data
    return [(data.global_crop_size // patch) ** 2 + 1] * 2 + [(data.local_crop_size // patch) ** 2 + 1] * \
        data.local_crops_number


def block_bytes_per_token(shapes: Shapes, tokens_in_crop: int, compute_bytes: int, kernel: str) -> float:
    """Saved activations of one block for one token of a crop of `tokens_in_crop` tokens (module docstring)."""
    width, heads = shapes.width, shapes.heads
    common = 8 * width + 14 * compute_bytes * width  # two fp32 norm inputs; linear, GELU and q, k, v inputs
    if kernel == "math":
        softmax = 4 * heads * tokens_in_crop + (compute_bytes * heads * tokens_in_crop if compute_bytes < 4 else 0)
        return common + softmax
    return common + compute_bytes * width + 4 * heads


def plan_memory(config: Config, world_size: int = 1, kernel: str = "flash", compute_bytes: int = 2,
                strategy: str = "none", recomputed_blocks: int = 0, fused_loss: bool = False,
                shapes: Shapes | None = None) -> MemoryPlan:
    """The predicted peak of one process. kernel: "math" or "flash" (any kernel that keeps no attention matrix);
    compute_bytes: 2 under bf16/fp16 autocast, 4 in fp32; strategy: none, ddp or fsdp; recomputed_blocks: how many
    blocks recompute their activations in the backward; fused_loss: the Triton loss runs."""
    shapes = shapes or network_shapes(config)
    data, out_dim = config.data, config.model.out_dim
    micro = data.batch_size_per_gpu // data.micro_batches
    shard = world_size if strategy == "fsdp" else 1
    params = shapes.student
    tokens = crop_tokens(config)
    rows = micro * len(tokens)
    plan = MemoryPlan()
    add = lambda name, value, rule: plan.terms.append(Term(name, float(value), rule))  # noqa: E731

    add("student weights", 4 * params / shard,
        f"{params:,} fp32 parameters" + (f" / {shard} ranks" if shard > 1 else ""))
    add("teacher weights", 4 * params / shard, "the same, fp32")
    grads = params if data.micro_batches > 1 else shapes.head
    add("gradients", 4 * grads / shard, "fp32; all once a micro-batch has run, else the head's (written first)")
    moments = 2 if config.optim.optimizer == "adamw" else 1
    add("optimizer state", 4 * moments * params / shard,
        f"{moments} fp32 moment{'s' if moments > 1 else ''} a parameter")
    if strategy == "ddp":
        add("DDP gradient buckets", 4 * params, "one more fp32 copy of the gradients")
    if strategy == "fsdp" and shard > 1:
        add("FSDP gathered units", compute_bytes * (shapes.root + 2 * shapes.block) * 2,
            "root unit and two blocks, gathered for the student and the teacher")
    elif compute_bytes < 4:
        add("autocast weight copies", compute_bytes * params, "low-precision student weights, kept for the step")

    recomputed = recomputed_indices(shapes.depth, recomputed_blocks) if recomputed_blocks else set()
    per_block = sum(block_bytes_per_token(shapes, n, compute_bytes, kernel) * n for n in tokens) * micro
    all_tokens = sum(tokens) * micro
    kept = [4 * shapes.width * all_tokens if index in recomputed else per_block for index in range(shapes.depth)]
    # the backward frees blocks from the last down: block i is recomputed with only the blocks below it still kept
    activations = max([sum(kept)] + [sum(kept[:index]) + per_block for index in recomputed])
    activations += 4 * shapes.width * all_tokens  # the final norm's input
    how = f"{kernel} attention, {micro} images a micro-batch, {sum(tokens)} tokens an image"
    add("saved activations", activations, how + (f", {len(recomputed)} of {shapes.depth} blocks recomputed"
                                                 if recomputed else ""))

    c = compute_bytes
    head = rows * c * (shapes.width + HEAD_HIDDEN_ROWS * config.model.head_hidden_dim)
    logits = rows * c * out_dim + 2 * micro * c * out_dim
    loss = rows * c * out_dim if fused_loss else rows * 4 * out_dim + micro * 16 * out_dim
    last_layer = (c + 4) * out_dim * shapes.bottleneck
    add("head and loss", head + logits + loss + last_layer,
        f"{rows} rows x K={out_dim:,}: logits, the {'fused' if fused_loss else 'plain'} loss's "
        "state, the last layer's weight")
    crop_pixels = 3 * (2 * data.global_crop_size ** 2 + data.local_crops_number * data.local_crop_size ** 2)
    add("batch on the device", 4 * crop_pixels * data.batch_size_per_gpu, "every crop of the process's batch, fp32")
    return plan


@dataclass(frozen=True)
class Fit:
    """What `data.micro_batches: auto` and `distributed.activation_checkpointing: auto` chose, and its plan."""

    micro_batches: int
    recomputed_blocks: int
    plan: MemoryPlan


def fit(config: Config, memory_bytes: float, micro_batches: Sequence[int], recomputed_blocks: Sequence[int],
        margin: float = 0.1, **plan_options) -> Fit | None:
    """The first (recomputed blocks, micro-batches) pair, in the orders given, whose plan fits `memory_bytes` less
    `margin`: callers list the fewest first, micro-batches before recomputation; None when none fits.
    `plan_options`: those of `plan_memory` but these two."""
    shapes = plan_options.pop("shapes", None) or network_shapes(config)
    for recomputed in recomputed_blocks:
        for count in micro_batches:
            trial = copy.deepcopy(config)
            trial.data.micro_batches = count
            plan = plan_memory(trial, recomputed_blocks=recomputed, shapes=shapes, **plan_options)
            if plan.total <= memory_bytes * (1 - margin):
                return Fit(count, recomputed, plan)
    return None


def device_memory_bytes(device: torch.device) -> int | None:
    """The device's memory (the host's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryChoice:
    """Micro-batches and recomputed blocks as the run uses them, and why."""

    micro_batches: int
    recomputed_blocks: int
    reason: str


def attention_kernel(config: Config, device: torch.device, dtype: torch.dtype, packed: bool) -> str:
    """What the memory plan counts for the attention that runs: "math" keeps the attention matrices (math, and the
    explicit-mask paths), "flash" does not (PyTorch's flash and variable-length kernels, xformers)."""
    if packed:
        shape = ARCHITECTURES[config.model.arch]
        kernel = packed_kernel(config.model.attention, device, dtype, shape["embed_dim"] // shape["num_heads"])
        return "flash" if kernel in ("xformers", "varlen_flash") else "math"
    return "math" if resolve_backend(config.model.attention, device) == "math" else "flash"


def resolve_memory(config: Config, device: torch.device, dtype: torch.dtype, fast: FastPaths, strategy: str,
                   world_size: int) -> MemoryChoice:
    """data.micro_batches and distributed.activation_checkpointing as set, or for `auto` the fewest micro-batches,
    then the fewest recomputed blocks, whose predicted peak (fastdino.memory_plan) fits the device's memory with a
    10% margin; ConfigError when not even one image per micro-batch with every block recomputed fits."""
    setting, batch = config.distributed, config.data.batch_size_per_gpu
    depth = config.model.depth or ARCHITECTURES[config.model.arch]["depth"]
    recomputed = {False: [0], True: [setting.checkpointed_blocks or depth], "auto": list(range(depth + 1))}[
        setting.activation_checkpointing]
    micro = config.data.micro_batches
    if micro != "auto" and setting.activation_checkpointing != "auto":
        return MemoryChoice(micro, recomputed[0], "as set")
    options = [micro] if micro != "auto" else divisors(batch)
    memory = device_memory_bytes(device)
    if memory is None:
        raise ConfigError(f"{device} does not say how much memory it has: set data.micro_batches and "
                          "distributed.activation_checkpointing instead of auto")
    chosen = fit(config, memory, options, recomputed, **run_options(config, device, dtype, fast, strategy, world_size))
    if chosen is None:
        raise ConfigError(f"data.batch_size_per_gpu={batch}: predicted not to fit the {memory / 2**30:.0f} GiB of "
                          f"{device} even at {batch // options[-1]} image(s) a micro-batch with "
                          f"{recomputed[-1]} blocks recomputed (fastdino plan shows the terms); use a smaller batch "
                          "or more processes")
    return MemoryChoice(chosen.micro_batches, chosen.recomputed_blocks,
                        f"auto: predicted peak {chosen.plan.total / 2**30:.1f} of {memory / 2**30:.0f} GiB")


def divisors(batch: int) -> list[int]:
    """The micro-batch counts that cut `batch` into equal parts, fewest first."""
    return [count for count in range(1, batch + 1) if batch % count == 0]


def run_options(config: Config, device: torch.device, dtype: torch.dtype, fast: FastPaths, strategy: str,
                world_size: int) -> dict:
    """`plan_memory`'s options for a run with these resolved parts."""
    return dict(world_size=world_size, strategy=strategy, kernel=attention_kernel(config, device, dtype, fast.packed),
                compute_bytes=dtype.itemsize, fused_loss=fast.fused_loss, shapes=network_shapes(config))


def planned_for(trainer: Any) -> MemoryPlan:
    """The plan of a built fastdino.trainer.Trainer as it resolved its settings: what a benchmark compares with the
    peak it measures."""
    config = copy.deepcopy(trainer.config)
    config.data.micro_batches = trainer.memory.micro_batches
    return plan_memory(config, recomputed_blocks=trainer.memory.recomputed_blocks,
                       **run_options(config, trainer.device, trainer.autocast_dtype, trainer.fast, trainer.strategy,
                                     trainer.ctx.world_size))


def planned_kernel(config: Config, on_gpu: bool) -> str:
    """The attention a run of `config` keeps memory for: on a GPU every backend but math runs a flash kernel (PyTorch's
    flash or variable-length attention, xformers); on a CPU `auto` is math."""
    attention = config.model.attention
    return "math" if attention == "math" or (attention == "auto" and not on_gpu) else "flash"


def parse_size(text: str) -> float:
    """"80GiB", "141 GiB", "24G" -> bytes (powers of 1024)."""
    number = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G").strip()
    value = float(number)
    if value <= 0:
        raise ValueError(text)
    return value * GiB


@report_usage_errors
def main(argv: Sequence[str] | None = None) -> str:
    """`fastdino plan CONFIG [key=value ...] [--gpus N] [--memory 80GiB] [--device cuda|cpu]`."""
    parser = CheckedArgumentParser(description="The predicted peak training memory of one process for a config, term "
                                               "by term, and with --memory what fits (what auto would choose).",
                                   rules={"--gpus": positive, "--memory": Rule("must be a size such as 80GiB",
                                                                               _is_size)})
    parser.add_argument("config", help="YAML recipe, e.g. configs/vit_base_p8.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as for fastdino train")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run uses (default: 1)")
    parser.add_argument("--memory", default=None, help="memory of one GPU, e.g. 80GiB or 141GiB (default: none)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the run computes: cuda (bf16, flash kernels) or cpu (fp32) (default: cuda)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    on_gpu = args.device == "cuda"
    strategy = config.distributed.strategy
    strategy = ("fsdp" if args.gpus > 1 else "none") if strategy == "auto" else strategy
    precision = config.precision if config.precision != "auto" else ("bf16" if on_gpu else "fp32")
    fused_loss = config.fast.fused_loss is True or (config.fast.fused_loss == "auto" and on_gpu)
    options = dict(world_size=args.gpus, strategy=strategy, kernel=planned_kernel(config, on_gpu),
                   compute_bytes=4 if precision == "fp32" else 2, fused_loss=fused_loss)
    shapes = network_shapes(config)
    micro = config.data.micro_batches if config.data.micro_batches != "auto" else 1
    trial = copy.deepcopy(config)
    trial.data.micro_batches = micro
    depth = shapes.depth
    checkpointing = config.distributed.activation_checkpointing
    recomputed = (config.distributed.checkpointed_blocks or depth) if checkpointing is True else 0
    data = config.data
    lines = [f"{config.model.arch} patch {config.model.patch_size}, {data.batch_size_per_gpu} images a process as "
             f"{micro} micro-batch{'es' if micro > 1 else ''}, 2 x {data.global_crop_size} + "
             f"{data.local_crops_number} x {data.local_crop_size} px crops, {precision}, {options['kernel']} "
             "attention, "
             f"strategy {strategy} over {args.gpus} process{'es' if args.gpus > 1 else ''}",
             plan_memory(trial, recomputed_blocks=recomputed, shapes=shapes, **options).table(
                 parse_size(args.memory) / GiB if args.memory else None)]
    if args.memory:
        batch = data.batch_size_per_gpu
        chosen = fit(config, parse_size(args.memory), divisors(batch), list(range(depth + 1)), shapes=shapes,
                     **options)
        lines.append("auto (10% margin): " + (
            f"{chosen.micro_batches} micro-batch{'es' if chosen.micro_batches > 1 else ''} of "
            f"{batch // chosen.micro_batches}, {chosen.recomputed_blocks} of {depth} blocks recomputed: predicted "
            f"{chosen.plan.total / GiB:.1f} GiB" if chosen else "nothing fits, not even one image a micro-batch with "
            "every block recomputed"))
    text = "\n".join(lines)
    print(text)
    return text


def _is_size(text: str) -> bool:
    try:
        parse_size(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
