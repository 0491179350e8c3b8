"""Optimizer construction and the gradient surgery of the reference: parameter groups, per-parameter
clipping, last-layer freezing."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def parameter_groups(model: nn.Module) -> list[dict]:
    """Two groups as the reference: weight decay on weight matrices only (not on biases or 1-D tensors).

    The scheduler sets the decay of group 0 every step; group 1 stays at zero.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str = "adamw", fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA when `fused`) or SGD with momentum; lr and weight decay come from the schedules."""
    groups = parameter_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}: use adamw or sgd")


@torch.no_grad()
def clip_gradients_(model: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Cap each parameter's gradient norm at `max_norm` separately, as the reference does, without a host sync.

    The reference loops in Python and reads every norm back to the host; here all norms come from one foreach
    call and the scales are applied on the device (a scale of exactly 1 where no clipping is needed).
    Returns the per-parameter norms (before clipping) as one tensor, or None when there is no gradient.

    Sharded (FSDP2 DTensor) gradients: a parameter's norm is that of its full gradient, so the squared norms of
    the local shards are summed over the shard group, one all_reduce for all parameters; each rank then scales
    its own shards.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    sharded = [isinstance(grad, DTensor) for grad in grads]
    local = [grad.to_local() if is_sharded else grad for grad, is_sharded in zip(grads, sharded)]
    norms = [norm.float() for norm in torch._foreach_norm(local, 2.0)]
    if any(sharded):
        norms = _full_norms_of_shards(norms, [grad for grad, is_sharded in zip(grads, sharded) if is_sharded], sharded)
    norms = torch.stack(norms)
    scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(local, list(scales.unbind()))
    return norms


def _full_norms_of_shards(norms: list[torch.Tensor], sharded_grads: list[DTensor], sharded: list[bool]):
    """Replace the shard norms (where `sharded`) by full-tensor norms: sqrt of the all-reduced squared shard norms."""
    mesh = sharded_grads[0].device_mesh
    for grad in sharded_grads:
        if grad.device_mesh != mesh or mesh.ndim != 1 or not all(p.is_shard() for p in grad.placements):
            raise ValueError("per-parameter clipping supports gradients sharded over one 1-D mesh (FSDP2 fully_shard)")
    squares = torch.stack([norm for norm, is_sharded in zip(norms, sharded) if is_sharded]).square()
    dist.all_reduce(squares, group=mesh.get_group())
    full = iter(squares.sqrt().unbind())
    return [next(full) if is_sharded else norm for norm, is_sharded in zip(norms, sharded)]


@torch.no_grad()
def clip_gradients_reference_(model: nn.Module, max_norm: float) -> list[float]:
    """The reference's loop, host sync included (one `.item()` per parameter): the baseline benchmarks measure."""
    norms = []
    for param in model.parameters():
        if param.grad is not None:
            norm = param.grad.norm(2)
            norms.append(norm.item())
            scale = max_norm / (norm + 1e-6)
            if scale < 1:
                param.grad.mul_(scale)
    return norms


def cancel_last_layer_gradients_(model: nn.Module) -> None:
    """Drop the gradients of the head's last layer (while it is frozen: the first optim.freeze_last_layer epochs,
    which stabilizes the start of training); the optimizer then skips those parameters."""
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None
