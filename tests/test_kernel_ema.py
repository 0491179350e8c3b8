"""The fused EMA kernel against its plain-PyTorch twin and the formula in fp64."""
import pytest
import torch

from fastdino.kernels import ema_update_, ema_update_reference_

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("size", [1, 1000, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_matches_reference_and_formula(size, dtype):
    generator = torch.Generator().manual_seed(size)
    teacher = torch.randn(size, generator=generator).to(DEVICE, dtype)
    student = torch.randn(size, generator=generator).to(DEVICE, dtype)
    momentum = 0.996
    expected = momentum * teacher.double() + (1 - momentum) * student.double()
    fused = ema_update_(teacher.clone(), student, momentum)
    reference = ema_update_reference_(teacher.clone(), student, momentum)
    assert fused.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(fused.double(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
    else:  # both round the same fp32 value to bf16: at most one bf16 step apart
        torch.testing.assert_close(fused.double(), expected, rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(fused, reference, rtol=8e-3, atol=1e-6)


def test_ema_mixed_dtypes_and_momentum_edges():
    teacher = torch.randn(300, device=DEVICE, dtype=torch.bfloat16)
    student = torch.randn(300, device=DEVICE)
    torch.testing.assert_close(ema_update_(teacher.clone(), student, 0.0), student.to(torch.bfloat16))
    torch.testing.assert_close(ema_update_(teacher.clone(), student, 1.0), teacher)


def test_ema_rejects_bad_buffers():
    with pytest.raises(ValueError, match="equal length"):
        ema_update_(torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE), 0.9)
    with pytest.raises(ValueError, match="1-D"):
        ema_update_reference_(torch.zeros(2, 2), torch.zeros(2, 2), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(torch.zeros(4, device=DEVICE), torch.zeros(4, device=DEVICE), 1.5)
