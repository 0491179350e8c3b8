"""The teacher as a momentum average of the student, over flat parameter buffers.

At start-up the parameters of both networks are copied into contiguous flat buffers (one per device and dtype) and
each parameter becomes a view into its buffer. The teacher update is then one fused kernel launch per buffer
(usually one in all) instead of the reference's two small kernels per parameter. Optimizer steps on the student
write through the views, so the buffers always hold the current weights; that is why `TeacherEMA` must be built
before the optimizer (an optimizer that copied or cached parameter storage earlier would hold stale tensors).

Only parameters take part (not buffers), matched by name. For FSDP2, `TeacherEMA.from_tensors` accepts any two
matched lists of plain tensors (e.g. the local shards of the DTensor parameters).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fastdino.kernels import ema_update_, ema_update_reference_
from fastdino.kernels.runtime import kernels_usable


def flatten_into_buffer_(tensors: Sequence[Tensor]) -> Tensor:
    """Copy same-dtype, same-device tensors into one new contiguous 1-D buffer and re-point each at its slice.

    After the call every tensor's `.data` is a view into the returned buffer (values unchanged), so in-place
    updates of either are seen by the other.
    """
    buffer = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for tensor in tensors:
        view = buffer[offset:offset + tensor.numel()].view_as(tensor)
        view.copy_(tensor.detach())
        tensor.data = view
        offset += tensor.numel()
    return buffer


def matched_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters of both modules paired by name; ValueError naming what does not match."""
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        only_student = sorted(student_params.keys() - teacher_params.keys())
        only_teacher = sorted(teacher_params.keys() - student_params.keys())
        raise ValueError(
            "student and teacher must have the same parameter names; "
            f"only in student: {only_student[:5]}, only in teacher: {only_teacher[:5]}"
        )
    names = list(student_params)
    return [student_params[n] for n in names], [teacher_params[n] for n in names]


class TeacherEMA:
    """Teacher <- momentum * teacher + (1 - momentum) * student over flat buffers.

    student, teacher: modules with the same parameter names, shapes, dtypes and devices.
    fused: use the Triton kernel (when the parameters are on CUDA, or on CPU under TRITON_INTERPRET=1; otherwise one
    plain-PyTorch op per buffer); False: the reference DINO per-parameter loop.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, fused: bool):
        student_params, teacher_params = matched_parameters(student, teacher)
        self._adopt(student_params, teacher_params, fused)

    @classmethod
    def from_tensors(
        cls, student_tensors: Sequence[Tensor], teacher_tensors: Sequence[Tensor], fused: bool, flatten: bool = True
    ) -> TeacherEMA:
        """Build from two matched lists of tensors (e.g. FSDP2 local shards) instead of modules.

        flatten=False leaves the tensors where they are and updates them in place, one multi-tensor launch per dtype
        group: needed for FSDP2 local shards, whose storage FSDP all-gathers from (re-pointing them into new flat
        buffers would detach them from it).
        """
        ema = cls.__new__(cls)
        ema._adopt(list(student_tensors), list(teacher_tensors), fused, flatten)
        return ema

    def _adopt(self, student_params: list[Tensor], teacher_params: list[Tensor], fused: bool,
               flatten: bool = True) -> None:
        if len(student_params) != len(teacher_params) or not student_params:
            raise ValueError(f"need matched, non-empty parameter lists; got {len(student_params)} student and "
                             f"{len(teacher_params)} teacher tensors")
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, (s, t) in enumerate(zip(student_params, teacher_params)):
            if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                raise ValueError(
                    f"parameter {index}: student {tuple(s.shape)} {s.dtype} {s.device} does not match teacher "
                    f"{tuple(t.shape)} {t.dtype} {t.device}"
                )
            groups.setdefault((s.device, s.dtype), []).append(index)
        self.fused = fused
        self.student_params = student_params
        self.teacher_params = teacher_params
        self.student_buffers: list[Tensor] = []
        self.teacher_buffers: list[Tensor] = []
        self._first_in_buffer: list[int] = []  # per buffer, the parameter laid out at its start
        self.flattened = flatten
        self._groups = [([student_params[i] for i in indices], [teacher_params[i] for i in indices])
                        for indices in groups.values()]
        if not flatten:
            return
        with torch.no_grad():
            for indices in groups.values():
                self.student_buffers.append(flatten_into_buffer_([student_params[i] for i in indices]))
                self.teacher_buffers.append(flatten_into_buffer_([teacher_params[i] for i in indices]))
                self._first_in_buffer.append(indices[0])

    def _check_still_views(self) -> None:
        """A later `module.to(...)` or `.half()` swaps parameter storage; the buffers would then go stale silently."""
        for index, student, teacher in zip(self._first_in_buffer, self.student_buffers, self.teacher_buffers):
            if (self.student_params[index].data_ptr() != student.data_ptr()
                    or self.teacher_params[index].data_ptr() != teacher.data_ptr()):
                raise RuntimeError(
                    "parameters no longer live in TeacherEMA's flat buffers (moved or cast after TeacherEMA was "
                    "built?): build TeacherEMA after moving the networks to their device and dtype"
                )

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One teacher step with the configured path (fused or reference loop)."""
        if self.fused:
            self.update_fused(momentum)
        else:
            self.update_reference_loop(momentum)

    @torch.no_grad()
    def update_fused(self, momentum: float) -> None:
        """One launch per flat buffer: the Triton kernel where it runs, else one plain-PyTorch op per buffer.
        Not flattened: one multi-tensor lerp per dtype group."""
        if not self.flattened:
            for students, teachers in self._groups:
                torch._foreach_lerp_(teachers, students, 1 - momentum)
            return
        self._check_still_views()
        for teacher, student in zip(self.teacher_buffers, self.student_buffers):
            if kernels_usable(teacher.device):
                ema_update_(teacher, student, momentum)
            else:
                ema_update_reference_(teacher, student, momentum)

    @torch.no_grad()
    def update_reference_loop(self, momentum: float) -> None:
        """The reference DINO's update: two small ops per parameter pair."""
        for teacher, student in zip(self.teacher_params, self.student_params):
            teacher.mul_(momentum).add_((1 - momentum) * student.detach())

    @torch.no_grad()
    def update_foreach(self, momentum: float) -> None:
        """The strong plain baseline: multi-tensor lerp over the parameter lists (teacher += (1-m)(student-teacher))."""
        torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - momentum)

    @property
    def numel(self) -> int:
        """Number of teacher parameter elements."""
        return sum(t.numel() for t in self.teacher_params)
