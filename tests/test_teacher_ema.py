"""TeacherEMA: flat-buffer layout, and its update paths against the reference per-parameter loop."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from fastdino.ema import TeacherEMA, flatten_into_buffer_


def student_and_teacher(seed=0):
    """A small real model (timm ViT) with a bf16 head, so that two dtype groups exist."""
    torch.manual_seed(seed)
    student = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                            num_classes=10)
    student.head.to(torch.bfloat16)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(torch.randn_like(param))
    return student, teacher


def reference_update(student, teacher, momentum):
    """The reference DINO loop, on deep copies."""
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
    return teacher


@pytest.mark.parametrize("method", ["update", "update_fused", "update_reference_loop", "update_foreach"])
def test_update_paths_match_reference_loop(method):
    student, teacher = student_and_teacher()
    ema = TeacherEMA(student, teacher, fused=True)
    expected = reference_update(student, teacher, 0.99)
    getattr(ema, method)(0.99)
    for (name, actual), wanted in zip(teacher.named_parameters(), expected.parameters()):
        tolerance = 8e-3 if actual.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(actual, wanted, rtol=tolerance, atol=1e-6, msg=name)


def test_parameters_become_views_of_one_buffer_per_dtype():
    student, teacher = student_and_teacher()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    ema = TeacherEMA(student, teacher, fused=False)
    assert sorted(str(b.dtype) for b in ema.student_buffers) == ["torch.bfloat16", "torch.float32"]
    assert ema.numel == sum(p.numel() for p in teacher.parameters())
    for name, param in student.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0)  # values kept
        buffer = next(b for b in ema.student_buffers if b.dtype == param.dtype)
        start = buffer.data_ptr()
        assert start <= param.data_ptr() < start + buffer.numel() * buffer.element_size(), name

    # An optimizer step on the student is seen by the flat buffer, and so by the next teacher update.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    features = student.forward_features(torch.randn(2, 3, 32, 32))  # fp32 trunk; the bf16 head gets a toy loss
    (features.square().mean() + student.head.weight.float().sum()).backward()
    optimizer.step()
    flat_student = torch.cat([b.float() for b in ema.student_buffers])
    flat_params = torch.cat([torch.cat([p.detach().float().flatten() for p in student.parameters()
                                        if p.dtype == b.dtype]) for b in ema.student_buffers])
    torch.testing.assert_close(flat_student, flat_params, rtol=0, atol=0)
    for name in ("blocks.0.mlp.fc1.weight", "head.weight"):
        assert not torch.equal(student.get_parameter(name), before[name])


def test_flatten_into_buffer_keeps_values_and_shares_storage():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(1)]
    copies = [t.clone() for t in tensors]
    buffer = flatten_into_buffer_(tensors)
    assert buffer.shape == (18,)
    torch.testing.assert_close(buffer, torch.cat([c.flatten() for c in copies]))
    buffer.zero_()
    assert all(torch.count_nonzero(t) == 0 for t in tensors)


def test_from_tensors_accepts_plain_tensor_lists():
    student = [torch.randn(10), torch.randn(2, 3)]
    teacher = [torch.randn(10), torch.randn(2, 3)]
    expected = [0.5 * t + 0.5 * s for t, s in zip(teacher, student)]
    TeacherEMA.from_tensors(student, teacher, fused=True).update(0.5)
    for actual, wanted in zip(teacher, expected):
        torch.testing.assert_close(actual, wanted)


def test_mismatched_modules_raise():
    with pytest.raises(ValueError, match="parameter names"):
        TeacherEMA(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), fused=True)
    with pytest.raises(ValueError, match="does not match"):
        TeacherEMA(nn.Linear(2, 3), nn.Linear(2, 4), fused=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback concerns CPU parameters")
def test_fused_falls_back_to_plain_torch_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    student, teacher = student_and_teacher()
    expected = reference_update(student, teacher, 0.9)
    TeacherEMA(student, teacher, fused=True).update(0.9)
    for actual, wanted in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(actual, wanted, rtol=8e-3, atol=1e-6)


def test_moving_parameters_after_construction_is_reported():
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    ema = TeacherEMA(student, teacher, fused=True)
    student.double()  # replaces the parameter storage: the flat buffers no longer back the module
    with pytest.raises(RuntimeError, match="build TeacherEMA after"):
        ema.update(0.9)
