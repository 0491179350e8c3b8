"""The DINO loss module: the center buffer and its update across ranks (the teacher temperature of each step comes
from the schedule record, `fastdino.schedules.StepSchedule`).

The arithmetic lives in `fastdino.kernels` (fused Triton kernel on CUDA, plain-PyTorch reference elsewhere);
this module owns the state around it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastdino import kernels


class DINOLoss(nn.Module):
    """Cross-entropy between the centered, sharpened teacher and the student, averaged over view pairs.

    After each step's loss the center moves towards the batch mean of the teacher logits (EMA, `center_momentum`),
    summed over all ranks. The all-reduce is started asynchronously and finished by `synchronize_center()`
    (the trainer calls it after the backward pass), so the communication overlaps the backward. A step split into
    micro-batches calls the loss once per micro-batch with `last_micro_batch` false but for the last: every
    micro-batch sees the center of the previous step, and the teacher sums add up into one update of the whole batch.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.fused = fused
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[torch.Tensor, int, object] | None = None
        self._accumulated: tuple[torch.Tensor, int] | None = None  # teacher sum and rows of the step's micro-batches

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float, monitors: bool = False,
        last_micro_batch: bool = True,
    ) -> kernels.DinoLossOutput:
        """student_logits [n_crops*B, K] crop-major, teacher_logits [2*B, K]; returns loss and monitors (of these B
        images: a step of several micro-batches averages them)."""
        self.synchronize_center()  # the previous step's update, if still pending (micro-batches start none)
        loss_fn = kernels.dino_loss_with_stats if self.fused else kernels.dino_loss_with_stats_reference
        output = loss_fn(
            student_logits,
            teacher_logits,
            self.center,
            teacher_temp,
            self.student_temp,
            n_global=2,
            monitors=monitors,
        )
        teacher_sum, rows = output.teacher_sum.detach(), teacher_logits.shape[0]
        if self._accumulated is not None:
            teacher_sum, rows = self._accumulated[0] + teacher_sum, self._accumulated[1] + rows
        self._accumulated = None if last_micro_batch else (teacher_sum, rows)
        if last_micro_batch:
            self._start_center_update(teacher_sum, rows)
        return output

    @torch.no_grad()
    def _start_center_update(self, teacher_sum: torch.Tensor, rows: int) -> None:
        work = None
        if dist.is_available() and dist.is_initialized():
            work = dist.all_reduce(teacher_sum, async_op=True)
        self._pending = (teacher_sum, rows, work)

    @torch.no_grad()
    def synchronize_center(self) -> None:
        """Finish the pending center update (no-op when there is none)."""
        if self._pending is None:
            return
        teacher_sum, rows, work = self._pending
        self._pending = None
        world_size = 1
        if work is not None:
            work.wait()
            world_size = dist.get_world_size()
        batch_center = teacher_sum.float() / (rows * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center.view_as(self.center), alpha=1 - self.center_momentum)


def mean_output(outputs: list[kernels.DinoLossOutput]) -> kernels.DinoLossOutput:
    """The loss output of a batch from those of its equal micro-batches: loss and monitors are means over rows, so
    their mean; the teacher sums add up."""
    def mean(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.stack(values).mean()

    return kernels.DinoLossOutput(
        loss=torch.stack([output.loss.detach() for output in outputs]).mean(),
        teacher_sum=torch.stack([output.teacher_sum for output in outputs]).sum(0),
        teacher_entropy=mean([output.teacher_entropy for output in outputs]),
        teacher_student_kl=mean([output.teacher_student_kl for output in outputs]),
    )
