"""The DINO loss as two Triton kernels, beside its plain-PyTorch reference.

The loss (Caron et al. 2021) averages, over every pair (global teacher view t, student view v != t) and over the
batch, the cross-entropy between the teacher distribution q_t = softmax((t - center) / teacher_temp) and the student
distribution p_v = softmax(s_v / student_temp). For one pair and one image

    CE(q_t, p_v) = logsumexp(z_v) - <q_t, z_v>,    z_v = s_v / student_temp,   (because sum(q_t) = 1)

so for a student row only the sum of the teacher distributions it is paired with matters,
Q_v = sum_{t != v} q_t, and its contribution and gradient are

    n_pairs_v * logsumexp(z_v) - <Q_v, z_v>,    d/ds_v = (n_pairs_v * softmax(z_v) - Q_v) / student_temp.

Kernels:
1. `_teacher_partials_kernel`, one program per block of K columns, all teacher rows: the column sums of the raw
   teacher logits (for the center update; deterministic, no atomics) and per (row, column block) partial softmax
   statistics of x = (t - center) / teacher_temp: block max, sum of exp(x - max), sum of exp(x - max) * (max - x).
   The teacher is read once.
2. `_student_kernel`, one program per student row: merges the partials of its (n_global) teacher rows into their
   logsumexp, then one looped online-logsumexp pass over the student row that also forms Q_v on the fly and
   accumulates <Q_v, z_v>; then, if a gradient is needed, a second pass over the same row (still in L2) that writes
   it. Programs are ordered image-major so the teacher rows shared by the crops of one image are reused from L2.

Why the gradient is produced in the forward kernel: the loss is a scalar, so its gradient is the one computed here
times the upstream scale; computing it while the row is hot saves a full re-read of the student logits in the
backward. The backward multiplies it by the upstream gradient on the device (skipping that pass when the upstream
gradient is 1 would need a host sync to find out). fp16 gradients are kept in fp32 until then, because
the unscaled gradient (~1e-7 per logit) underflows fp16 before a GradScaler's factor is applied.

No [rows, K] fp32 buffer exists besides the gradient (none at all under `torch.no_grad`). Non-finite teacher
logits or center poison the loss with NaN (a -inf teacher logit alone would otherwise vanish into q = 0); non-finite
student logits already make the loss non-finite.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastdino.kernels.runtime import interpreting, kernels_usable

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Block sizes. Under the interpreter every reduction costs milliseconds whatever its size, hence larger blocks there.
TEACHER_BLOCK_K = 2048 if interpreting() else 256  # columns per program of the teacher kernel
TEACHER_BLOCK_ROWS = 32
STUDENT_BLOCK_K = 8192 if interpreting() else 2048


class DinoLossOutput(NamedTuple):
    """What one loss evaluation gives the trainer.

    loss: scalar fp32 (differentiable w.r.t. the student logits).
    teacher_sum: [K] fp32 column sum of the raw teacher logits over all teacher rows (for the center EMA).
    teacher_entropy: scalar fp32 mean over teacher rows of H(q_t), or None unless monitors were asked for.
    teacher_student_kl: scalar fp32 mean KL(q_t || p_v) over the loss's (t, v != t) pairs, or None likewise.
    """

    loss: Tensor
    teacher_sum: Tensor
    teacher_entropy: Tensor | None
    teacher_student_kl: Tensor | None


class LossLayout(NamedTuple):
    batch: int  # B, images per step on this device
    n_crops: int  # student views per image, globals first
    n_global: int
    n_terms: int  # number of (teacher view, other student view) pairs


def check_layout(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float, student_temp: float,
    n_global: int,
) -> LossLayout:
    """Validate shapes, dtypes and temperatures; infer B and the number of crops. Raises ValueError."""
    layout_help = (
        "expected student_logits [n_crops * B, K] with rows crop-major [crop0 x B, crop1 x B, ...] (the "
        f"{n_global} global crops first), teacher_logits [{n_global} * B, K] with rows [global0 x B, global1 x B, "
        "...], center [K] or [1, K]"
    )
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"{layout_help}; got student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    num_classes = teacher_logits.shape[1]
    if student_logits.shape[1] != num_classes or center.numel() != num_classes:
        raise ValueError(
            f"{layout_help}; K differs: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"center {tuple(center.shape)}"
        )
    if n_global < 1 or teacher_logits.shape[0] == 0 or teacher_logits.shape[0] % n_global != 0:
        raise ValueError(f"{layout_help}; teacher has {teacher_logits.shape[0]} rows, not a positive multiple of "
                         f"n_global={n_global}")
    batch = teacher_logits.shape[0] // n_global
    if student_logits.shape[0] % batch != 0 or student_logits.shape[0] // batch < max(n_global, 2):
        raise ValueError(
            f"{layout_help}; student has {student_logits.shape[0]} rows, which is not n_crops * B with B={batch} "
            f"(= teacher rows / n_global) and n_crops >= {max(n_global, 2)}"
        )
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {SUPPORTED_DTYPES}")
    if not teacher_temp > 0 or not student_temp > 0:
        raise ValueError(f"temperatures must be > 0; got teacher_temp={teacher_temp}, student_temp={student_temp}")
    n_crops = student_logits.shape[0] // batch
    return LossLayout(batch, n_crops, n_global, n_global * (n_crops - 1))


# ----------------------------------------------------------------------------------------------- plain PyTorch twin


def dino_loss_with_stats_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    monitors: bool = False,
) -> DinoLossOutput:
    """Plain-PyTorch DINO loss (runs on CPU in training); same contract as `dino_loss_with_stats`.

    One softmax of the teacher and one log_softmax of the student; the pair sum uses
    sum_{t, v != t} <q_t, log p_v> = <sum_t q_t, sum_v log p_v> - sum_{v < n_global} <q_v, log p_v>.
    """
    layout = check_layout(student_logits, teacher_logits, center, teacher_temp, student_temp, n_global)
    batch, num_classes = layout.batch, teacher_logits.shape[1]
    teacher_scaled = (teacher_logits.float() - center.reshape(1, -1).float()) / teacher_temp
    log_q = F.log_softmax(teacher_scaled, dim=-1).view(n_global, batch, num_classes)
    q = log_q.exp()
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(layout.n_crops, batch, num_classes)
    paired_q_log_p = (q.sum(0) * log_p.sum(0)).sum() - (q * log_p[:n_global]).sum()
    loss = -paired_q_log_p / (layout.n_terms * batch)
    teacher_sum = teacher_logits.float().sum(dim=0)
    # A -inf teacher logit only zeroes one q; the contract wants non-finite inputs to show in the loss.
    inputs_finite = torch.isfinite(teacher_sum).all() & torch.isfinite(center).all()
    loss = torch.where(inputs_finite, loss, torch.full_like(loss, float("nan")))
    if not monitors:
        return DinoLossOutput(loss, teacher_sum, None, None)
    entropy = -torch.special.xlogy(q, q).sum(-1).mean()
    # Each teacher view pairs with the same number of student views, so mean KL = mean CE - mean H(q_t).
    return DinoLossOutput(loss, teacher_sum, entropy, loss.detach() - entropy)


def dino_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float,
    student_temp: float = 0.1, n_global: int = 2,
) -> Tensor:
    """Plain-PyTorch DINO loss (scalar fp32); see `dino_loss`."""
    return dino_loss_with_stats_reference(
        student_logits, teacher_logits, center, teacher_temp, student_temp, n_global
    ).loss


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _teacher_partials_kernel(
    teacher_ptr, center_ptr, teacher_sum_ptr, part_max_ptr, part_sum_ptr, part_gap_ptr,
    n_rows, num_classes, teacher_stride, n_blocks, teacher_temp,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program j: columns [j*BLOCK_K, (j+1)*BLOCK_K) of all teacher rows -> column sums and per-row partials."""
    block = tl.program_id(0)
    cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < num_classes
    center = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    column_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for row_start in range(0, n_rows, BLOCK_ROWS):
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * teacher_stride + cols[None, :]
        logits = tl.load(teacher_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        column_sum += tl.sum(logits, axis=0)
        scaled = (logits - center[None, :]) / teacher_temp
        block_max = tl.max(tl.where(ok, scaled, float("-inf")), axis=1)
        # x * 0 is NaN exactly when x is inf or NaN: carried into the normalizer, it poisons the loss.
        weights = tl.where(ok, tl.exp(scaled - block_max[:, None]) + scaled * 0.0, 0.0)
        block_sum = tl.sum(weights, axis=1)
        # sum of exp(x - max) * (max - x) >= 0: gives the entropy without cancelling large terms.
        block_gap = tl.sum(weights * (block_max[:, None] - scaled), axis=1)
        part = rows * n_blocks + block
        tl.store(part_max_ptr + part, block_max, mask=row_ok)
        tl.store(part_sum_ptr + part, block_sum, mask=row_ok)
        tl.store(part_gap_ptr + part, block_gap, mask=row_ok)
    tl.store(teacher_sum_ptr + cols, column_sum, mask=col_ok)


@triton.jit
def _student_block_and_paired_teacher(
    student_row_ptr, teacher_ptr, teacher_rows, teacher_stride, center_ptr, paired, cols, col_ok,
    student_temp, teacher_temp, run_max, teacher_log_sum,
):
    """One block of columns: z = s / student_temp, and Q = the sum of the paired teacher probabilities there."""
    z = tl.load(student_row_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) / student_temp
    center = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    t_ok = paired[:, None] & col_ok[None, :]
    t = tl.load(teacher_ptr + teacher_rows[:, None] * teacher_stride + cols[None, :], mask=t_ok, other=0.0)
    x = (t.to(tl.float32) - center[None, :]) / teacher_temp
    q = tl.exp((x - run_max[:, None]) - teacher_log_sum[:, None])
    return z, tl.sum(tl.where(t_ok, q, 0.0), axis=0)


@triton.jit
def _student_kernel(
    student_ptr, teacher_ptr, center_ptr, part_max_ptr, part_sum_ptr, row_loss_ptr, grad_ptr,
    batch, n_crops, num_classes, student_stride, teacher_stride, grad_stride, n_blocks,
    student_temp, teacher_temp, grad_scale,
    N_GLOBAL: tl.constexpr, GLOBAL_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_PARTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """One student row (crop v, image b): its loss contribution and, if asked, its gradient times grad_scale."""
    pid = tl.program_id(0)
    image = pid // n_crops  # image-major order: the crops of one image run together and share teacher rows in L2
    crop = pid % n_crops
    student_row = crop.to(tl.int64) * batch + image

    # Teacher rows of this image: t * B + b for global view t; padded up to a power of two and masked.
    views = tl.arange(0, GLOBAL_PAD)
    view_ok = views < N_GLOBAL
    paired = view_ok & (views != crop)
    teacher_rows = views.to(tl.int64) * batch + image

    # Merge the per-block partials of those rows into logsumexp((t - center) / teacher_temp).
    run_max = tl.full([GLOBAL_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([GLOBAL_PAD], dtype=tl.float32)
    for part_start in range(0, n_blocks, BLOCK_PARTS):
        parts = part_start + tl.arange(0, BLOCK_PARTS)
        ok = view_ok[:, None] & (parts < n_blocks)[None, :]
        offsets = teacher_rows[:, None] * n_blocks + parts[None, :]
        part_max = tl.load(part_max_ptr + offsets, mask=ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + offsets, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(part_max, axis=1))
        new_max = tl.where(view_ok, new_max, 0.0)  # padded views: keep finite, they are masked out below
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(part_sum * tl.exp(part_max - new_max[:, None]), axis=1)
        run_max = new_max
    # Kept apart (not max + log(sum)) so that exp((x - max) - log_sum) does not lose precision for large x.
    teacher_log_sum = tl.where(view_ok, tl.log(run_sum), 0.0)

    is_global = (crop < N_GLOBAL).to(tl.float32)
    n_pairs = N_GLOBAL - is_global

    # Pass 1: online logsumexp of z = s / student_temp and <Q, z>, Q = sum of the paired teacher distributions.
    row_max = float("-inf")
    row_sum = 0.0
    q_dot_z = 0.0
    for col_start in range(0, num_classes, BLOCK_K):
        cols = col_start + tl.arange(0, BLOCK_K)
        col_ok = cols < num_classes
        z, q_paired = _student_block_and_paired_teacher(
            student_ptr + student_row * student_stride, teacher_ptr, teacher_rows, teacher_stride, center_ptr,
            paired, cols, col_ok, student_temp, teacher_temp, run_max, teacher_log_sum,
        )
        z_masked = tl.where(col_ok, z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z_masked, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z_masked - new_max), axis=0)
        row_max = new_max
        q_dot_z += tl.sum(tl.where(col_ok, q_paired * z, 0.0), axis=0)
    row_log_sum = tl.log(row_sum)
    tl.store(row_loss_ptr + pid, n_pairs * (row_max + row_log_sum) - q_dot_z)

    if COMPUTE_GRAD:
        # Pass 2: d(loss)/ds = (n_pairs * softmax(z) - Q) / student_temp * grad_scale.
        for col_start in range(0, num_classes, BLOCK_K):
            cols = col_start + tl.arange(0, BLOCK_K)
            col_ok = cols < num_classes
            z, q_paired = _student_block_and_paired_teacher(
                student_ptr + student_row * student_stride, teacher_ptr, teacher_rows, teacher_stride, center_ptr,
                paired, cols, col_ok, student_temp, teacher_temp, run_max, teacher_log_sum,
            )
            grad = (n_pairs * tl.exp((z - row_max) - row_log_sum) - q_paired) * (grad_scale / student_temp)
            tl.store(grad_ptr + student_row * grad_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=col_ok)


# ------------------------------------------------------------------------------------------ launch and autograd


def _num_warps(block_elements: int) -> int:
    return 8 if block_elements >= 2048 else 4


def _teacher_partials(teacher: Tensor, center: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> teacher_sum [K], part_max / part_sum / part_gap [T, n_blocks] (all fp32)."""
    n_rows, num_classes = teacher.shape
    n_blocks = triton.cdiv(num_classes, TEACHER_BLOCK_K)
    block_rows = min(TEACHER_BLOCK_ROWS, triton.next_power_of_2(n_rows))
    teacher_sum = torch.empty(num_classes, dtype=torch.float32, device=teacher.device)
    part_max, part_sum, part_gap = torch.empty(3, n_rows, n_blocks, dtype=torch.float32, device=teacher.device)
    _teacher_partials_kernel[(n_blocks,)](
        teacher, center, teacher_sum, part_max, part_sum, part_gap,
        n_rows, num_classes, teacher.stride(0), n_blocks, teacher_temp,
        BLOCK_ROWS=block_rows, BLOCK_K=TEACHER_BLOCK_K, num_warps=_num_warps(block_rows * TEACHER_BLOCK_K),
    )
    return teacher_sum, part_max, part_sum, part_gap


def _entropy_from_partials(part_max: Tensor, part_sum: Tensor, part_gap: Tensor) -> Tensor:
    """Mean over teacher rows of H(q) = sum_k q_k (lse - x_k), from the per-block partials (m_b, s_b, g_b):
    H = sum_b exp(m_b - lse) * (s_b * (lse - m_b) + g_b), a sum of non-negative terms."""
    row_max = part_max.amax(dim=1, keepdim=True)
    log_total = torch.log((part_sum * torch.exp(part_max - row_max)).sum(dim=1, keepdim=True))
    lse_minus_max = row_max - part_max + log_total
    entropy = (torch.exp(-lse_minus_max) * (part_sum * lse_minus_max + part_gap)).sum(dim=1)
    return entropy.mean()


def _fused_forward(
    student: Tensor, teacher: Tensor, center: Tensor, teacher_temp: float, student_temp: float, layout: LossLayout,
    compute_grad: bool, monitors: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """-> loss, gradient (scaled for an upstream gradient of 1) or None, teacher_sum, teacher entropy or None."""
    teacher_sum, part_max, part_sum, part_gap = _teacher_partials(teacher, center, teacher_temp)
    n_rows, num_classes = student.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    grad = None
    if compute_grad:
        grad_dtype = torch.float32 if student.dtype == torch.float16 else student.dtype
        grad = torch.empty(student.shape, dtype=grad_dtype, device=student.device)
    grad_scale = 1.0 / (layout.n_terms * layout.batch)
    n_blocks = part_max.shape[1]
    block_k = min(STUDENT_BLOCK_K, triton.next_power_of_2(num_classes))
    _student_kernel[(n_rows,)](
        student, teacher, center, part_max, part_sum, row_loss, row_loss if grad is None else grad,
        layout.batch, layout.n_crops, num_classes, student.stride(0), teacher.stride(0),
        0 if grad is None else grad.stride(0), n_blocks,
        student_temp, teacher_temp, grad_scale,
        N_GLOBAL=layout.n_global, GLOBAL_PAD=max(2, triton.next_power_of_2(layout.n_global)), BLOCK_K=block_k,
        BLOCK_PARTS=min(256, triton.next_power_of_2(n_blocks)), COMPUTE_GRAD=compute_grad,
        num_warps=_num_warps(block_k),
    )
    loss = row_loss.sum() * grad_scale
    entropy = _entropy_from_partials(part_max, part_sum, part_gap) if monitors else None
    return loss, grad, teacher_sum, entropy


class _PrecomputedGradient(torch.autograd.Function):
    """Gives `loss` the gradient the forward kernel already computed: d(loss)/d(student) = grad * upstream."""

    @staticmethod
    def forward(ctx, student, loss, grad):
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # always scale on the device: testing grad_loss == 1 to skip this pass would cost a host sync per step
        return (grad * grad_loss).to(ctx.student_dtype), None, None


def _contiguous_rows(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def dino_loss_with_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
    monitors: bool = False,
) -> DinoLossOutput:
    """Fused DINO loss plus the teacher column sum (and, with `monitors`, teacher entropy and teacher-student KL).

    student_logits: [n_crops * B, K] fp32/bf16/fp16, rows crop-major with the n_global global crops first.
    teacher_logits: [n_global * B, K] fp32/bf16/fp16, rows [global0 x B, global1 x B, ...]; treated as constant.
    center: [K] or [1, K]. Temperatures are run-time floats (changing them does not recompile).
    The gradient w.r.t. student_logits comes back in its dtype. Raises ValueError on a bad layout.
    """
    layout = check_layout(student_logits, teacher_logits, center, teacher_temp, student_temp, n_global)
    if student_logits.device != teacher_logits.device or center.device != teacher_logits.device:
        raise ValueError(
            f"student_logits, teacher_logits and center must be on one device; got {student_logits.device}, "
            f"{teacher_logits.device}, {center.device}"
        )
    if not kernels_usable(student_logits.device):
        raise ValueError(f"the fused DINO loss runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); got "
                         f"{student_logits.device}: use dino_loss_reference there")
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    loss, grad, teacher_sum, entropy = _fused_forward(
        _contiguous_rows(student_logits.detach()), _contiguous_rows(teacher_logits.detach()),
        center.detach().reshape(-1).contiguous(), float(teacher_temp), float(student_temp), layout, compute_grad,
        monitors,
    )
    if compute_grad:
        loss = _PrecomputedGradient.apply(student_logits, loss, grad)
    if not monitors:
        return DinoLossOutput(loss, teacher_sum, None, None)
    # Each teacher view pairs with the same number of student views, so mean KL = mean CE - mean H(q_t).
    return DinoLossOutput(loss, teacher_sum, entropy, loss.detach() - entropy)


def dino_loss(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, teacher_temp: float,
    student_temp: float = 0.1, n_global: int = 2,
) -> Tensor:
    """Fused DINO loss, scalar fp32, differentiable w.r.t. student_logits; layouts as `dino_loss_with_stats`."""
    return dino_loss_with_stats(student_logits, teacher_logits, center, teacher_temp, student_temp, n_global).loss
