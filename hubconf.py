"""torch.hub entry points, as the reference DINO repository has them:

    torch.hub.load("/path/to/fastdino", "vit_small", patch_size=8, weights="runs/x/checkpoint.pth", source="local")

`weights` is any checkpoint `fastdino.hub.load_pretrained` reads (fastdino's, sharded folders, the reference's
full or backbone-only files), read as data; nothing is downloaded. Without `weights` the network is randomly
initialized.
"""
from __future__ import annotations

from torch import nn

dependencies = ["torch", "timm"]


def _backbone(arch: str, patch_size: int | None, weights: str | None, **kwargs) -> nn.Module:
    """`patch_size`: checked against `weights` when both are given, read from them when only they are; 16 (the
    reference's default) for a random network."""
    from fastdino.hub import load_pretrained
    from fastdino.models import build_vit

    if weights is None:
        return build_vit(arch, patch_size=patch_size or 16, **kwargs)
    return load_pretrained(weights, arch, patch_size=patch_size, **kwargs)


def vit_tiny(patch_size: int | None = None, weights: str | None = None, **kwargs) -> nn.Module:
    """ViT-Tiny (192 wide, 3 heads) DINO backbone."""
    return _backbone("vit_tiny", patch_size, weights, **kwargs)


def vit_small(patch_size: int | None = None, weights: str | None = None, **kwargs) -> nn.Module:
    """ViT-Small (384 wide, 6 heads) DINO backbone."""
    return _backbone("vit_small", patch_size, weights, **kwargs)


def vit_base(patch_size: int | None = None, weights: str | None = None, **kwargs) -> nn.Module:
    """ViT-Base (768 wide, 12 heads) DINO backbone."""
    return _backbone("vit_base", patch_size, weights, **kwargs)
