"""The fused DINO loss where tests/test_kernel_dino_loss.py does not look: fp16 gradients small enough to underflow
fp16 before the GradScaler's factor is applied, and numbers of global crops other than 2.

References are independent: the paper's double loop over (teacher view t, student view v != t) written here, in
float64 on the same (fp16) inputs upcast. On CPU the kernels run under the Triton interpreter: sizes are small.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdino.kernels import dino_loss, dino_loss_reference, dino_loss_with_stats, dino_loss_with_stats_reference

# The interpreter evaluates masked-out lanes too (e.g. log(0) of padded views); the kernels discard them.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEACHER_TEMP, STUDENT_TEMP = 0.04, 0.1


def paper_loss(student, teacher, center, n_global, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP):
    """Mean over the pairs (t, v), t a global view, v any other view, of the batch-mean cross-entropy; fp64.
    Returns (loss, number of pairs, mean KL over the pairs, mean teacher entropy)."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    total, pairs, kl_total = 0.0, 0, 0.0
    entropy = 0.0
    for t in range(n_global):
        log_q = F.log_softmax((teacher[t * batch:(t + 1) * batch] - center) / teacher_temp, dim=-1)
        entropy = entropy + (-(log_q.exp() * log_q).sum(-1)).mean()
        for v in range(n_crops):
            if v == t:
                continue
            log_p = F.log_softmax(student[v * batch:(v + 1) * batch] / student_temp, dim=-1)
            total = total + (-(log_q.exp() * log_p).sum(-1)).mean()
            kl_total = kl_total + (log_q.exp() * (log_q - log_p)).sum(-1).mean()
            pairs += 1
    return total / pairs, pairs, kl_total / pairs, entropy / n_global


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------ fp16 gradients below fp16's normal range
@pytest.mark.parametrize("loss_fn", [dino_loss, dino_loss_with_stats])
def test_fp16_gradient_is_not_rounded_to_fp16_before_the_loss_scale(loss_fn):
    """12 crops x 2 images (44 pairs x batch 2: every gradient entry is scaled by 1/88), K = 8192 and nearly flat
    distributions: the true gradient entries are ~1e-6, below fp16's smallest normal (6.1e-5) and some below half
    its smallest subnormal (3e-8). A GradScaler-style upstream factor of 2^16 brings them into fp16's normal range,
    but only if the kernel keeps the gradient in fp32 until that multiplication; rounded or accumulated in fp16
    earlier, it loses ~3% (norm-relative), 150 times this test's tolerance."""
    batch, n_crops, num_classes, logit_scale = 2, 12, 8192, 5e-4
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(n_crops * batch, num_classes, generator=generator) * logit_scale).half()
    teacher = (torch.randn(2 * batch, num_classes, generator=generator) * logit_scale).half()
    center = torch.randn(1, num_classes, generator=generator) * logit_scale / 4

    exact_student = student.double().requires_grad_()
    expected_loss, pairs, _, _ = paper_loss(exact_student, teacher, center, n_global=2)
    assert pairs == 2 * (n_crops - 1)
    expected_loss.backward()
    expected = exact_student.grad
    # meaningful: every true entry would be an fp16 subnormal (or zero) if it were stored unscaled
    assert expected.abs().max() < 6.1e-5 and (expected.abs() < 2.0**-25).any()

    loss_scale = 2.0**16
    fused_student = student.to(DEVICE).requires_grad_()
    out = loss_fn(fused_student, teacher.to(DEVICE), center.to(DEVICE), TEACHER_TEMP)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    (loss * loss_scale).backward()
    grad = fused_student.grad
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    unscaled = grad.cpu().double() / loss_scale
    # fp16 rounding of the scaled gradient alone: ~2^-12 relative per entry
    assert relative_error(unscaled, expected) < 1e-3
    # no entry whose scaled value is a normal fp16 number may come back as zero
    normal = expected.abs() * loss_scale >= 2.0**-14
    assert normal.float().mean() > 0.99 and (unscaled[normal] != 0).all(), "entries flushed to zero"
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())


# ------------------------------------------------------------------ other numbers of global crops
@pytest.mark.parametrize("n_global,n_local", [(1, 2), (3, 2), (3, 0), (4, 1)])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_any_number_of_global_crops_matches_the_paper_loop(n_global, n_local, fused):
    """`n_global` is an argument of both loss functions (teacher rows [n_global * B], globals first among the
    student crops): loss, gradient, monitors and teacher column sums follow the paper's definition for 1, 3 and 4
    global crops, with n_global * (n_crops - 1) pairs."""
    batch, num_classes = 3, 97
    n_crops = n_global + n_local
    generator = torch.Generator().manual_seed(n_global * 10 + n_local)
    student = torch.randn(n_crops * batch, num_classes, generator=generator) * 3
    teacher = torch.randn(n_global * batch, num_classes, generator=generator) * 3
    center = torch.randn(1, num_classes, generator=generator)

    exact_student = student.double().requires_grad_()
    expected_loss, pairs, expected_kl, expected_entropy = paper_loss(exact_student, teacher, center, n_global)
    assert pairs == n_global * (n_crops - 1)
    expected_loss.backward()

    loss_fn = dino_loss_with_stats if fused else dino_loss_with_stats_reference
    got_student = student.to(DEVICE).requires_grad_()
    out = loss_fn(got_student, teacher.to(DEVICE), center.to(DEVICE), TEACHER_TEMP, STUDENT_TEMP,
                  n_global=n_global, monitors=True)
    out.loss.backward()
    assert abs(out.loss.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
    assert relative_error(got_student.grad.cpu(), exact_student.grad) < 1e-5
    assert abs(out.teacher_student_kl.item() - expected_kl.item()) <= 1e-5 * abs(expected_kl.item()) + 1e-6
    assert abs(out.teacher_entropy.item() - expected_entropy.item()) <= 1e-4 * abs(expected_entropy.item()) + 1e-6
    torch.testing.assert_close(out.teacher_sum.cpu().double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4)
    scalar = (dino_loss if fused else dino_loss_reference)(
        student.to(DEVICE), teacher.to(DEVICE), center.to(DEVICE), TEACHER_TEMP, STUDENT_TEMP, n_global=n_global)
    assert abs(scalar.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())


@pytest.mark.parametrize("loss_fn", [dino_loss, dino_loss_reference])
def test_global_crop_count_that_does_not_fit_the_rows_is_refused(loss_fn):
    student = torch.randn(3 * 2, 16, device=DEVICE)  # 3 crops x B=2
    center = torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match="n_global"):
        loss_fn(student, torch.randn(5, 16, device=DEVICE), center, TEACHER_TEMP, n_global=2)  # 5 rows, 2 views
    with pytest.raises(ValueError, match="n_global"):
        loss_fn(student, torch.randn(2, 16, device=DEVICE), center, TEACHER_TEMP, n_global=0)
    with pytest.raises(ValueError, match="n_crops >= 4"):  # B=1: 4 global views but 3 student crops
        loss_fn(student[:3], torch.randn(4, 16, device=DEVICE), center, TEACHER_TEMP, n_global=4)
