"""GPU only: the full fastdino step (every fast path `auto`) computes the reference-style step's loss on the same
weights and batch, and keeps training finite. Skips without CUDA."""
import pytest
import torch
from helpers import tiny_config, write_image_folder

from fastdino.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REFERENCE_STYLE = ("precision=fp32", "model.attention=math", "fast.fused_loss=false", "fast.fused_ema=false",
                   "fast.packed=false", "fast.efficient_drop_path=false", "fast.fused_adamw=false",
                   "fast.sync_free_clip=false", "data.loader=torch")


@pytest.mark.gpu
def test_cuda_fast_step_matches_reference_style(tmp_path):
    images = write_image_folder(tmp_path / "images")
    common = ("device=cuda", "model.drop_path_rate=0.0", "optim.warmup_epochs=0", "model.out_dim=4099")
    reference = Trainer(tiny_config(images, tmp_path / "reference", *common, *REFERENCE_STYLE))
    fast = Trainer(tiny_config(images, tmp_path / "fast", *common, "data.loader=torch"))
    assert fast.fast.fused_loss and fast.fast.fused_ema and fast.autocast_dtype == torch.bfloat16
    fast.student.load_state_dict(reference.student.state_dict())
    fast.teacher.load_state_dict(reference.teacher.state_dict())
    crops, _ = next(iter(reference.loader.epoch_iter(0)))
    losses = []
    for trainer in (reference, fast):
        losses.append([trainer.train_step(crops).loss.item() for _ in range(3)])
    assert losses[1][0] == pytest.approx(losses[0][0], rel=2e-2)  # bf16 against fp32
    assert all(torch.isfinite(torch.tensor(losses[1])))
    torch.testing.assert_close(fast.dino_loss.center, reference.dino_loss.center, rtol=5e-2, atol=5e-3)
