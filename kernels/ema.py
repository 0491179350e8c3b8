"""Teacher momentum update over one flat buffer: teacher = momentum * teacher + (1 - momentum) * student.

With all teacher parameters laid out in one contiguous buffer (fastdino/ema.py), the whole update is one launch that
reads both buffers once and writes the teacher once, instead of the reference's two small kernels per parameter.
Math in fp32 whatever the storage dtype; `momentum` is a run-time float (its schedule never recompiles the kernel).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastdino.kernels.runtime import kernels_usable

EMA_BLOCK = 4096


@triton.jit
def _ema_kernel(teacher_ptr, student_ptr, n_elements, momentum, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n_elements
    teacher = tl.load(teacher_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    student = tl.load(student_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    updated = teacher * momentum + student * (1.0 - momentum)
    tl.store(teacher_ptr + offsets, updated.to(teacher_ptr.dtype.element_ty), mask=ok)


def _check_buffers(teacher_flat: Tensor, student_flat: Tensor, momentum: float) -> None:
    if teacher_flat.shape != student_flat.shape or teacher_flat.dim() != 1:
        raise ValueError(
            f"expected two 1-D buffers of equal length; got teacher {tuple(teacher_flat.shape)}, "
            f"student {tuple(student_flat.shape)}"
        )
    if not teacher_flat.is_contiguous() or not student_flat.is_contiguous():
        raise ValueError("teacher_flat and student_flat must be contiguous")
    if teacher_flat.device != student_flat.device:
        raise ValueError(f"buffers on different devices: {teacher_flat.device} and {student_flat.device}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1]; got {momentum}")


def ema_update_(teacher_flat: Tensor, student_flat: Tensor, momentum: float) -> Tensor:
    """In place, one launch: teacher_flat = momentum * teacher_flat + (1 - momentum) * student_flat.

    teacher_flat, student_flat: 1-D contiguous [N], fp32/bf16/fp16 (may differ). Returns teacher_flat.
    """
    _check_buffers(teacher_flat, student_flat, momentum)
    if not kernels_usable(teacher_flat.device):
        raise ValueError(f"ema_update_ runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); got "
                         f"{teacher_flat.device}: use ema_update_reference_ there")
    n_elements = teacher_flat.numel()
    if n_elements:
        _ema_kernel[(triton.cdiv(n_elements, EMA_BLOCK),)](
            teacher_flat, student_flat, n_elements, float(momentum), BLOCK=EMA_BLOCK, num_warps=8
        )
    return teacher_flat


def ema_update_reference_(teacher_flat: Tensor, student_flat: Tensor, momentum: float) -> Tensor:
    """Plain-PyTorch twin of `ema_update_` (the reference DINO's formula, fp32 math). Returns teacher_flat."""
    _check_buffers(teacher_flat, student_flat, momentum)
    updated = teacher_flat.float().mul_(momentum).add_(student_flat.float(), alpha=1.0 - momentum)
    return teacher_flat.copy_(updated)
