"""Stochastic depth: residual branches dropped per sample.

`x + drop_path(branch(x))` is the reference (DINO/timm): the branch runs on every sample, then the outputs of dropped
samples are multiplied by 0 and the others by 1/keep_prob. `efficient_residual` draws the same per-sample Bernoulli
mask but runs the branch only on the kept samples (index-select, branch, scale, index_add), which saves
`drop_prob` of the branch compute; its output has the same distribution as the reference.

A "sample" is a row of a dense `[B, N, D]` batch, or one sequence of a packed `[1, T, D]` batch described by
`seq_lens`. In the packed multi-crop forward each sequence is one crop of one image, so every (crop, image) gets its
own independent mask: the same distribution as the reference, which draws an independent mask over the rows of each
per-resolution backbone call.

No host sync (this runs in every residual branch of every training step, 24 per ViT-S student forward): the branch's
input size is the number of kept samples, so the host must know it without reading it from the device. The keep
decisions are therefore drawn on the host, from the CPU generator with the reference's rule (the very draws of the
reference on a CPU; on a GPU the reference draws from the GPU generator, whose values the host could only read by
waiting for the device), read there, and copied to the device from pinned memory without blocking. The kept index is
built on the device from that mask and the count the host knows (a stable sort, not `nonzero()`, which reads the count
back from the device).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastdino.models.attention import per_token, to_device_async

# branch(x, seq_lens) -> same shape as x; seq_lens is None for dense batches.
Branch = Callable[[Tensor, Sequence[int] | None], Tensor]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """The reference per-sample drop: zero whole rows of `x` `[B, ...]` with probability `drop_prob`, scale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * keep


def _draw_keep(num_samples: int, keep_prob: float) -> Tensor:
    """Per-sample keep decisions [num_samples] bool on the host: the reference's rule floor(keep_prob + U) with U from
    the CPU generator, so a CPU fp32 reference run with the same seed keeps the same samples."""
    return (keep_prob + torch.rand(num_samples, device="cpu")).floor_() == 1


def _token_keep_scale(seq_lens: Sequence[int], keep_prob: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`[1, T, 1]` factor: 1/keep_prob on tokens of kept sequences, 0 elsewhere (one draw per sequence)."""
    keep = _draw_keep(len(seq_lens), keep_prob).to(dtype) / keep_prob
    return per_token(to_device_async(keep, device), seq_lens)[None, :, None]


def _first_true(mask: Tensor, count: int) -> Tensor:
    """Positions of the `count` True entries of `mask` [n], ascending. A stable sort puts them first; `nonzero()`
    would need the count from the device, a host sync, while here the host already knows it."""
    return torch.argsort(mask.logical_not(), stable=True)[:count]


def plain_residual(
    x: Tensor, branch: Branch, drop_prob: float, training: bool, seq_lens: Sequence[int] | None
) -> Tensor:
    """`x + drop_path(branch(x))`, the reference: the branch runs on every sample."""
    y = branch(x, seq_lens)
    if drop_prob == 0.0 or not training:
        return x + y
    if seq_lens is None:
        return x + drop_path(y, drop_prob, training)
    return x + y * _token_keep_scale(seq_lens, 1.0 - drop_prob, y.device, y.dtype)


def efficient_residual(
    x: Tensor, branch: Branch, drop_prob: float, training: bool, seq_lens: Sequence[int] | None
) -> Tensor:
    """Same distribution as `plain_residual`, but the branch only runs on kept samples.

    Dense x `[B, N, D]`: kept rows are selected; packed x `[1, T, D]`: the tokens of kept sequences are selected and the
    branch receives the kept sequences' lengths. The branch output is scaled by 1/keep_prob and added back in place of
    the kept samples (`index_add`); dropped samples pass through unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x + branch(x, seq_lens)
    keep_prob = 1.0 - drop_prob
    keep = _draw_keep(x.shape[0] if seq_lens is None else len(seq_lens), keep_prob)
    kept = keep.tolist()  # a read of host memory, not of the device
    if not any(kept):
        return x
    keep = to_device_async(keep, x.device)
    if seq_lens is None:
        index = _first_true(keep, sum(kept))
        y = branch(x.index_select(0, index), None)
        return x.index_add(0, index, y.to(x.dtype), alpha=1.0 / keep_prob)
    kept_lens = [length for length, is_kept in zip(seq_lens, kept) if is_kept]
    index = _first_true(per_token(keep, seq_lens), sum(kept_lens))
    y = branch(x.index_select(1, index), kept_lens)
    return x.index_add(1, index, y.to(x.dtype), alpha=1.0 / keep_prob)
