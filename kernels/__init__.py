"""Triton kernels of fastdino, each beside its plain-PyTorch reference (imported as `fastdino.kernels`)."""
from fastdino.kernels.dino_loss import (
    DinoLossOutput,
    dino_loss,
    dino_loss_reference,
    dino_loss_with_stats,
    dino_loss_with_stats_reference,
)
from fastdino.kernels.ema import ema_update_, ema_update_reference_

__all__ = [
    "DinoLossOutput",
    "dino_loss",
    "dino_loss_reference",
    "dino_loss_with_stats",
    "dino_loss_with_stats_reference",
    "ema_update_",
    "ema_update_reference_",
]
