"""The fused DINO loss against its plain-PyTorch twin, and the twin against a transcription of the paper's loop.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), where every reduction costs milliseconds:
cases are sized to keep this file to seconds.
"""
import importlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastdino.kernels import (
    dino_loss,
    dino_loss_reference,
    dino_loss_with_stats,
    dino_loss_with_stats_reference,
)

loss_module = importlib.import_module("fastdino.kernels.dino_loss")
# The interpreter evaluates masked-out lanes too (e.g. -inf - -inf); the kernels discard them.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEACHER_TEMP = 0.04


def make_inputs(batch, n_local, num_classes, scale, dtype=torch.float32, n_global=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_crops = n_global + n_local
    student = (torch.randn(n_crops * batch, num_classes, generator=generator) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(n_global * batch, num_classes, generator=generator) * scale).to(DEVICE, dtype)
    center = (torch.randn(1, num_classes, generator=generator) * scale / 4).to(DEVICE)
    return student, teacher, center


def loop_loss(student, teacher, center, teacher_temp, student_temp=0.1, n_global=2):
    """Direct transcription of the reference DINO loss: softmax, log_softmax, loops over teacher and student views."""
    batch = teacher.shape[0] // n_global
    student_views = (student / student_temp).chunk(student.shape[0] // batch)
    teacher_views = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(n_global)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_views):
        for v, student_view in enumerate(student_views):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_view, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def monitors_by_definition(student, teacher, center, teacher_temp, student_temp=0.1, n_global=2):
    """Teacher entropy and mean KL(q_t || p_v) over the loss's pairs, straight from the definitions (fp64)."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    batch = teacher.shape[0] // n_global
    teacher_scaled = (teacher - center) / teacher_temp
    entropy = torch.distributions.Categorical(logits=teacher_scaled).entropy().mean()
    log_q = F.log_softmax(teacher_scaled, dim=-1).chunk(n_global)
    log_p = F.log_softmax(student / student_temp, dim=-1).chunk(student.shape[0] // batch)
    kls = [
        F.kl_div(log_p[v], log_q[t], log_target=True, reduction="batchmean")
        for t in range(n_global) for v in range(len(log_p)) if v != t
    ]
    return entropy, torch.stack(kls).mean()


def close_entropy(actual, expected):
    """Random large logits make near one-hot teachers (entropy ~1e-9): compare absolutely there."""
    return abs(actual.item() - expected.item()) <= 1e-6 + 1e-3 * abs(expected.item())


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def loss_and_grad(loss_fn, student, teacher, center, **kw):
    student = student.detach().clone().requires_grad_()
    out = loss_fn(student, teacher, center, TEACHER_TEMP, **kw)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    return out, student.grad


@pytest.mark.parametrize("batch,n_local,num_classes", [(1, 0, 37), (3, 2, 33), (2, 10, 130)])
def test_reference_matches_paper_loop(batch, n_local, num_classes):
    student, teacher, center = make_inputs(batch, n_local, num_classes, scale=5)
    ref, ref_grad = loss_and_grad(dino_loss_with_stats_reference, student, teacher, center, monitors=True)
    loop, loop_grad = loss_and_grad(loop_loss, student.double(), teacher.double(), center.double())
    assert relative_error(ref.loss, loop) < 1e-5
    assert relative_error(ref_grad, loop_grad) < 1e-5
    entropy, kl = monitors_by_definition(student, teacher, center, TEACHER_TEMP)
    assert close_entropy(ref.teacher_entropy, entropy)
    assert relative_error(ref.teacher_student_kl, kl) < 1e-5
    assert torch.allclose(ref.teacher_sum.double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4)


FUSED_CASES = [
    # batch, n_local, K, logit scale, dtype
    (1, 0, 4099, 20, torch.float32),
    (3, 2, 4099, 3, torch.float32),
    (2, 10, 1537, 1, torch.float32),  # logits of the recipe's size: soft distributions
    (3, 2, 4099, 3, torch.bfloat16),
    (2, 1, 4099, 10, torch.float16),
]


@pytest.mark.parametrize("batch,n_local,num_classes,scale,dtype", FUSED_CASES)
def test_fused_matches_reference(batch, n_local, num_classes, scale, dtype):
    student, teacher, center = make_inputs(batch, n_local, num_classes, scale, dtype)
    fused, grad = loss_and_grad(dino_loss_with_stats, student, teacher, center, monitors=True)
    ref, ref_grad = loss_and_grad(dino_loss_with_stats_reference, student, teacher, center, monitors=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert grad.dtype == dtype and fused.loss.dtype == torch.float32
    assert relative_error(fused.loss, ref.loss) < tolerance
    assert relative_error(grad, ref_grad) < tolerance
    assert torch.allclose(fused.teacher_sum, teacher.float().sum(0), rtol=1e-5, atol=1e-3)
    entropy, kl = monitors_by_definition(student, teacher, center, TEACHER_TEMP)
    assert close_entropy(fused.teacher_entropy, entropy)
    assert relative_error(fused.teacher_student_kl, kl) < max(tolerance, 1e-5)


def test_fused_over_many_blocks(monkeypatch):
    """Small blocks force the online logsumexp and the partial merge across several blocks of a row."""
    monkeypatch.setattr(loss_module, "STUDENT_BLOCK_K", 512)
    monkeypatch.setattr(loss_module, "TEACHER_BLOCK_K", 128)
    monkeypatch.setattr(loss_module, "TEACHER_BLOCK_ROWS", 2)
    student, teacher, center = make_inputs(2, 1, 2500, 10)
    fused, grad = loss_and_grad(dino_loss, student, teacher, center)
    ref, ref_grad = loss_and_grad(dino_loss_reference, student, teacher, center)
    assert relative_error(fused, ref) < 1e-5
    assert relative_error(grad, ref_grad) < 1e-5


def test_fused_recipe_size():
    """K = 65536 as in the recipe, with a few rows (the interpreter is slow)."""
    student, teacher, center = make_inputs(1, 1, 65536, 5, torch.bfloat16)
    fused, grad = loss_and_grad(dino_loss_with_stats, student, teacher, center)
    ref, ref_grad = loss_and_grad(dino_loss_with_stats_reference, student, teacher, center)
    assert relative_error(fused.loss, ref.loss) < 1e-5  # both accumulate the same bf16 inputs in fp32
    assert relative_error(grad, ref_grad) < 2e-2
    assert torch.allclose(fused.teacher_sum, ref.teacher_sum, rtol=1e-5, atol=1e-3)


def test_upstream_gradient_and_no_grad():
    student, teacher, center = make_inputs(2, 1, 300, 5)
    student = student.requires_grad_()
    (dino_loss(student, teacher, center, TEACHER_TEMP) * 3.0).backward()
    ref_student = student.detach().clone().requires_grad_()
    (dino_loss_reference(ref_student, teacher, center, TEACHER_TEMP) * 3.0).backward()
    assert relative_error(student.grad, ref_student.grad) < 1e-5
    with torch.no_grad():
        loss = dino_loss(student, teacher, center, TEACHER_TEMP)
    assert not loss.requires_grad
    assert relative_error(loss, dino_loss_reference(student.detach(), teacher, center, TEACHER_TEMP)) < 1e-5


@pytest.mark.parametrize("where,value", [
    ("student", math.inf), ("student", -math.inf), ("student", math.nan),
    ("teacher", math.inf), ("teacher", -math.inf), ("teacher", math.nan), ("center", math.inf),
])
def test_non_finite_inputs_give_non_finite_loss(where, value):
    inputs = dict(zip(("student", "teacher", "center"), make_inputs(1, 1, 50, 3)))
    inputs[where].view(-1)[7] = value
    args = (inputs["student"], inputs["teacher"], inputs["center"], TEACHER_TEMP)
    assert not torch.isfinite(dino_loss(*args))
    assert not torch.isfinite(dino_loss_reference(*args))


@pytest.mark.parametrize("loss_fn", [dino_loss, dino_loss_reference])
def test_bad_layouts_raise_helpful_errors(loss_fn):
    student, teacher, center = make_inputs(4, 2, 16, 1)  # B = 4, 4 crops
    with pytest.raises(ValueError, match="crop-major"):
        loss_fn(student[:-1], teacher, center, TEACHER_TEMP)  # 15 student rows: not n_crops * B
    with pytest.raises(ValueError, match="crop-major"):
        loss_fn(student[:4], teacher, center, TEACHER_TEMP)  # a single crop: no pair to compare
    with pytest.raises(ValueError, match="n_global"):
        loss_fn(student, teacher[:-1], center, TEACHER_TEMP)
    with pytest.raises(ValueError, match="K differs"):
        loss_fn(student[:, :-1], teacher, center, TEACHER_TEMP)
    with pytest.raises(ValueError, match="K differs"):
        loss_fn(student, teacher, center[:, :-1], TEACHER_TEMP)
    with pytest.raises(ValueError, match="crop-major"):
        loss_fn(student[0], teacher, center, TEACHER_TEMP)
    with pytest.raises(ValueError, match="temperatures"):
        loss_fn(student, teacher, center, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        loss_fn(student.double(), teacher, center, TEACHER_TEMP)


def test_temperatures_are_runtime_arguments():
    """A changing teacher temperature must not recompile: temperatures are plain (not constexpr) arguments."""
    for kernel in (loss_module._teacher_partials_kernel, loss_module._student_kernel):
        parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        for name in ("teacher_temp", "student_temp"):
            if name in parameters:
                assert "constexpr" not in str(parameters[name].annotation)
    assert "teacher_temp" in inspect.signature(loss_module._student_kernel.fn).parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled-kernel cache exists only on GPU")
def test_changing_temperature_does_not_recompile():
    student, teacher, center = make_inputs(2, 2, 1000, 3)
    kernel = loss_module._student_kernel
    if not hasattr(kernel, "device_caches"):
        pytest.skip("this triton version keeps its compiled kernels elsewhere")

    def n_compiled():  # device_caches: device -> (kernel_cache, ...) on triton 3.x
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    dino_loss(student, teacher, center, 0.04)
    before = n_compiled()
    dino_loss(student, teacher, center, 0.07)
    assert n_compiled() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="concerns CPU tensors")
def test_fused_on_cpu_without_interpreter_says_what_to_use(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    student, teacher, center = make_inputs(1, 1, 16, 1)
    with pytest.raises(ValueError, match="dino_loss_reference"):
        dino_loss(student, teacher, center, TEACHER_TEMP)
