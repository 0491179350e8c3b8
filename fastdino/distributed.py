"""Process groups and the data-parallel wrapping of student and teacher (FSDP2, DDP, or none).

Under FSDP2 (`distributed.strategy=fsdp`, the default when the world size is above 1) both networks are sharded
the same way: one `fully_shard` per transformer block, one at the root (`MultiCropWrapper`). Each rank then holds
the same slice of every student and teacher parameter, so the teacher's momentum update runs on local shards with
no communication. Parameters stay fp32 (the master weights the optimizer and the EMA update); on CUDA the blocks
compute in bf16 (FSDP casts the all-gathered parameters) and gradients are reduced in fp32.

Under DDP the student is replicated and its gradients all-reduced; the teacher is a plain replicated module that
every rank updates identically.

Launch: `torchrun --nproc_per_node=8 train.py ...` (one node) or with `--nnodes`, `--rdzv_backend=c10d` and
`--rdzv_endpoint=host:port` on several nodes; NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("auto", "fsdp", "ddp", "none")


@dataclass
class DistributedContext:
    """Who this process is: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device
    _mesh: DeviceMesh | None = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        """A process group exists (also true for a world of one started explicitly, e.g. by the FSDP benchmark)."""
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def single(cls, device: torch.device | None = None) -> "DistributedContext":
        return cls(0, 1, device or torch.device("cpu"))

    def mesh(self) -> DeviceMesh:
        """The 1-D mesh over all ranks that FSDP shards over (created on first use; needs a process group)."""
        if self._mesh is None:
            if not self.initialized:
                raise RuntimeError("FSDP needs a process group: start with torchrun, or init_process_group first")
            self._mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        return self._mesh

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a metric over ranks (identity in a single process)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the process group `torchrun` describes (NCCL on GPUs, gloo on CPU), or run as a single process (on the
    GPU `cuda:N` names, if one is named). Training and the eval commands start the same way.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (multi-node: through its rendezvous).
    """
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if device_preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but CUDA is not available (use device=auto or cpu)")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        index = torch.device(device_preference).index if device_preference.startswith("cuda") else None
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index) if use_cuda else \
            torch.device("cpu")
        return DistributedContext.single(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                "use --nproc_per_node equal to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistributedContext(rank, world_size, device)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the process group this process joined, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def print_on_rank0(message: str) -> None:
    """A command's result line, said once under torchrun."""
    if rank_and_world_size()[0] == 0:
        print(message)


def shutdown_distributed() -> None:
    """Leave the process group at the end of a run (NCCL warns when a process exits without it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, ctx: DistributedContext) -> str:
    """`auto` -> fsdp with more than one process, none otherwise. fsdp/ddp in a world of one need a process
    group (the benchmark measures the wrapping overhead that way)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "fsdp" if ctx.world_size > 1 else "none"
    if strategy == "none" and ctx.world_size > 1:
        raise ValueError(
            f"distributed.strategy=none cannot train with {ctx.world_size} processes: use fsdp or ddp (or auto)"
        )
    if strategy in ("fsdp", "ddp") and not ctx.initialized:
        if ctx.world_size > 1:
            raise RuntimeError("no process group although the world size is above 1: call init_distributed first")
        return "none"
    return strategy


def mixed_precision_policy(device: torch.device, autocast_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction on CUDA; full fp32 elsewhere."""
    if device.type == "cuda" and autocast_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_activation_checkpointing(backbone: nn.Module, count: int = 0) -> None:
    """Recompute `count` transformer blocks' activations in the backward instead of storing them (0: every block),
    spread evenly over the depth.

    Uses the composable `checkpoint` so that parameter names (and so checkpoints and the EMA matching) are
    unchanged. Must run before `fully_shard`.
    """
    from torch.distributed._composable import checkpoint

    blocks = _blocks(backbone)
    for index in sorted(recomputed_indices(len(blocks), count)):
        checkpoint(blocks[index])


def recomputed_indices(depth: int, count: int) -> set[int]:
    """Which of `depth` blocks recompute when `count` do (0: all), spread evenly from the first."""
    count = count or depth
    return {position * depth // count for position in range(count)}


def apply_fsdp(network: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> nn.Module:
    """FSDP2 over `network` (a MultiCropWrapper): one unit per transformer block, the rest (patch embedding,
    tokens, final norm, head) in the root unit. Returns the same module, now an FSDPModule."""
    for block in _blocks(network.backbone):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(network, mesh=mesh, mp_policy=policy)
    return network


def _blocks(backbone: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(backbone).__name__} has no `blocks` ModuleList to wrap block by block")
    return blocks


def wrap_networks(
    student: nn.Module,
    teacher: nn.Module,
    config,
    ctx: DistributedContext,
    fast,
    strategy: str | None = None,
    autocast_dtype: torch.dtype = torch.float32,
    recomputed_blocks: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Wrap student and teacher (already on ctx.device, identical weights on every rank) for `strategy`
    (resolved from config.distributed.strategy when None), with `recomputed_blocks` of the student's blocks
    recomputed in the backward."""
    strategy = strategy or resolve_strategy(config.distributed.strategy, ctx)
    if recomputed_blocks:
        apply_activation_checkpointing(student.backbone, recomputed_blocks)  # the teacher keeps no activations
    if strategy == "fsdp":
        policy = mixed_precision_policy(ctx.device, autocast_dtype)
        return apply_fsdp(student, ctx.mesh(), policy), apply_fsdp(teacher, ctx.mesh(), policy)
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=device_ids), teacher
    return student, teacher


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (FSDP2 modules are the network itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce their gradients across ranks only when `enabled`: micro-batches before the last
    accumulate locally (DDP's no_sync, FSDP2's set_requires_gradient_sync), so a step reduces once."""
    if enabled:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def build_teacher_ema(student: nn.Module, teacher: nn.Module, fused: bool):
    """The teacher's momentum update for wrapped networks.

    FSDP2: over the local shards, in place and without flattening (FSDP all-gathers from its own sharded storage,
    which re-pointing the shards into flat buffers would detach). DDP / single process: the flat-buffer layout.
    """
    from fastdino.ema import TeacherEMA, matched_parameters

    student, teacher = unwrap(student), unwrap(teacher)
    if not is_sharded(student):
        return TeacherEMA(student, teacher, fused=fused)
    student_params, teacher_params = matched_parameters(student, teacher)
    with torch.no_grad():
        return TeacherEMA.from_tensors(
            [local_tensor(p) for p in student_params], [local_tensor(p) for p in teacher_params], fused, flatten=False
        )


def reshard(module: nn.Module) -> None:
    """Free the all-gathered parameters of an FSDP module (no-op otherwise).

    After a no-grad forward the FSDP root keeps its parameters unsharded (it expects a backward); the teacher has
    none, and its next forward must all-gather the freshly updated shards rather than reuse stale full copies.
    """
    if isinstance(module, FSDPModule):
        module.reshard()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors (names without wrapper prefixes).

    Collective under FSDP: every rank must call it; rank 0 receives the tensors, other ranks an empty dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = unwrap(module)
    if not is_sharded(module):
        return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """One picklable object from every rank, as a list indexed by rank (every rank receives it)."""
    if ctx.world_size == 1 or not ctx.initialized:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
