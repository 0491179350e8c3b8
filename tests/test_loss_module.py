"""The DINO loss module (temperature schedule, center EMA) against a transcription of the reference's class."""
import pytest
import torch
import torch.nn.functional as F

from fastdino.loss import DINOLoss
from fastdino.schedules import teacher_temperature_schedule


class ReferenceDINOLoss:
    """The reference main_dino.DINOLoss arithmetic, single process, written out as the paper's pseudocode."""

    def __init__(self, out_dim, ncrops, temps, student_temp=0.1, center_momentum=0.9):
        self.ncrops, self.temps = ncrops, temps
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.center = torch.zeros(1, out_dim, dtype=torch.float64)

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.temps[epoch], dim=-1).chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v != iq:
                    total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    terms += 1
        batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total / terms


@pytest.mark.parametrize("local_crops", [0, 3])
def test_loss_and_center_follow_the_reference_over_steps(local_crops):
    torch.manual_seed(0)
    out_dim, batch, epochs = 37, 3, 4
    temps = teacher_temperature_schedule(0.04, 0.07, 2, epochs)
    module = DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)
    reference = ReferenceDINOLoss(out_dim, 2 + local_crops, temps)
    for epoch in range(epochs):
        student = (torch.randn((2 + local_crops) * batch, out_dim, dtype=torch.float64) * 5).requires_grad_()
        teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64) * 5 + 1.0
        got = module(student.float(), teacher.float(), float(temps[epoch]), monitors=True)
        expected = reference(student, teacher, epoch)
        torch.testing.assert_close(got.loss.double(), expected, rtol=1e-5, atol=1e-6)
        grad_got = torch.autograd.grad(got.loss, student)[0]
        grad_expected = torch.autograd.grad(expected, student)[0]
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-7)
        module.synchronize_center()
        torch.testing.assert_close(module.center.double(), reference.center, rtol=1e-5, atol=1e-6)
        assert got.teacher_entropy is not None and float(got.teacher_entropy) >= 0


def test_center_update_waits_for_synchronize():
    module = DINOLoss(5)
    module(torch.randn(4, 5), torch.ones(4, 5), 0.04)
    assert torch.equal(module.center, torch.zeros(1, 5))
    module.synchronize_center()
    torch.testing.assert_close(module.center, torch.full((1, 5), 0.1))
