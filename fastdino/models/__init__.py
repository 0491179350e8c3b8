"""Vision Transformer backbones, the DINO head and the multi-crop wrapper."""
from fastdino.models.attention import ATTENTION_BACKENDS, resolve_backend, xformers_usable
from fastdino.models.head import DINOHead, WeightNormLinear
from fastdino.models.multicrop import MultiCropWrapper, group_by_resolution
from fastdino.models.vit import VisionTransformer, build_vit, vit_base, vit_small, vit_tiny

__all__ = [
    "ATTENTION_BACKENDS",
    "DINOHead",
    "MultiCropWrapper",
    "VisionTransformer",
    "WeightNormLinear",
    "build_vit",
    "group_by_resolution",
    "resolve_backend",
    "vit_base",
    "vit_small",
    "vit_tiny",
    "xformers_usable",
]
