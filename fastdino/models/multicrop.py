"""Run backbone + head over a list of crops of several resolutions (2 global crops, then the local crops)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def group_by_resolution(crops: list[Tensor]) -> list[Tensor]:
    """Concatenate runs of consecutive crops of equal spatial size: [B, 3, H, W] each -> fewer, larger batches.

    Rows keep their order (crop-major), so the output of all groups concatenated is the output of all crops.
    """
    groups: list[list[Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [torch.cat(group) if len(group) > 1 else group[0] for group in groups]


class MultiCropWrapper(nn.Module):
    """Backbone on every crop, head once on all CLS features.

    packed=False (the reference): one backbone call per run of equal-resolution crops.
    packed=True: one backbone call for all crops as a single packed sequence (`VisionTransformer.forward_packed`):
    the same function, but the linear layers see every token at once. Needs a backbone with `forward_packed`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        if packed and not hasattr(backbone, "forward_packed"):
            raise ValueError(f"packed=True needs a backbone with forward_packed(); {type(backbone).__name__} has none")
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, crops: list[Tensor] | Tensor) -> Tensor:
        """crops: list of [B_i, 3, H_i, W_i] (or one tensor) -> logits [sum B_i, out_dim], rows crop-major."""
        if isinstance(crops, Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropWrapper got an empty list of crops")
        groups = group_by_resolution(list(crops))
        if self.packed:
            features = self.backbone.forward_packed(groups)
        else:
            features = torch.cat([self.backbone(group) for group in groups])
        return self.head(features)
