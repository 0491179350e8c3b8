"""GPU only: packed crops take PyTorch's variable-length flash attention wherever the GPU has it (compute
capability 8.0 and above). Its probe keeps the exception's text, so a build or driver that cannot run it fails here
with the reason, instead of every packed step quietly taking the explicit-mask path. Skips without CUDA."""
import pytest
import torch

from fastdino.models.attention import varlen_attention_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
def test_variable_length_attention_runs_on_compute_capability_8_and_above():
    index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < (8, 0):
        pytest.skip(f"compute capability {capability}: flash attention needs 8.0")
    assert varlen_attention_error(index) is None
