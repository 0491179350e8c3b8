"""The GPU-decode loader's augmentation: one crop slot of a batch of decoded images, as batched torch tensor ops
on the images' device (CUDA or CPU), with each image's own drawn parameters (`gpu_decode_draws.CropParams`).

torchvision's semantics on float images: bicubic antialiased resized crop, flip, ColorJitter in each image's order,
grayscale, Gaussian blur (an exact Gaussian, window 2*ceil(3 sigma)+1, reflect padding: torchvision's gaussian_blur),
solarization at the recipe's threshold, normalization by the recipe's mean and std.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fastdino.data.gpu_decode_draws import CropParams
from fastdino.data.recipe import BRIGHTNESS, CONTRAST, SATURATION, MultiCropRecipe


def _resized_crop(image: torch.Tensor, window: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] (0-255) or float (0-1) -> float [1, 3, size, size], bicubic and antialiased (not clamped)."""
    top, left, height, width = window
    region = image[:, top:top + height, left:left + width].unsqueeze(0)
    if not region.is_floating_point():
        region = region.float().div_(255)
    return F.interpolate(region, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images, num_output_channels=1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(ratio)
    return (images * ratio + other * (1 - ratio)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of float RGB images [B, 3, H, W] in [0, 1] by hue[b] (a fraction of the colour circle)."""
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    red, green, blue = images.unbind(dim=1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(value == red, (green - blue) / safe_chroma,
                       torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4))
    hue6 = torch.where(chroma > 0, hue6, torch.zeros_like(hue6))
    hue6 = torch.remainder(hue6 + 6 * hue.view(-1, 1, 1), 6.0)
    # HSV -> RGB: channel n takes v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue6.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)).clamp_(0, 1)


def _jitter_op(op: int, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter's operation `op` on float images [n, 3, H, W] with per-image factors [n] (torchvision semantics)."""
    if op == BRIGHTNESS:
        return (images * _per_image(factors)).clamp_(0, 1)
    if op == CONTRAST:
        return _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), factors)
    if op == SATURATION:
        return _blend(images, _luma(images), factors)
    return adjust_hue(images, factors)


def _color_jitter(images: torch.Tensor, params: Sequence[CropParams]) -> torch.Tensor:
    """Each image's jitter operations in its own order: position by position, one batched call per operation on the
    images that take it at that position."""
    factors = torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue] for p in params]).to(images.device)
    for position in range(4):
        for op in range(4):
            chosen = [b for b, p in enumerate(params)
                      if p.jitter_order and position < len(p.jitter_order) and p.jitter_order[position] == op]
            if chosen:
                index = torch.tensor(chosen).to(images.device)
                images[index] = _jitter_op(op, images[index], factors[index, op])
    return images


def gaussian_blur(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Blur float images [n, 3, H, W] with per-image sigmas (n floats > 0): window 2*ceil(3 sigma)+1, reflect
    padding (torchvision's gaussian_blur for each image), as one grouped separable convolution."""
    n, channels, height, width = images.shape
    half = min(math.ceil(3 * max(sigmas)), height - 1, width - 1)  # from host floats: no device sync
    sigmas = torch.tensor(sigmas, dtype=images.dtype).to(images.device)
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    reach = torch.ceil(3 * sigmas).clamp_(max=half).unsqueeze(1)  # each image's own window half-width
    kernels = torch.exp(-0.5 * (offsets / sigmas.unsqueeze(1)) ** 2) * (offsets.abs() <= reach)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [n * 3, K]
    padded = F.pad(images.reshape(1, n * channels, height, width), (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernels.view(n * channels, 1, 1, -1), groups=n * channels)
    blurred = F.conv2d(blurred, kernels.view(n * channels, 1, -1, 1), groups=n * channels)
    return blurred.view(n, channels, height, width)


def augment_batch(images: Sequence[torch.Tensor], params: Sequence[CropParams], size: int,
                  dtype: torch.dtype = torch.float32, *, recipe: MultiCropRecipe = MultiCropRecipe()) -> torch.Tensor:
    """One crop slot for a batch: images [3, H_b, W_b], uint8 (0-255) or float (0-1), all on one device (CPU or
    CUDA), and one CropParams each -> normalized crops [B, 3, size, size] in `dtype` on that device. `recipe` gives
    the solarization threshold and the normalization."""
    if len(images) != len(params) or not images:
        raise ValueError(f"need one CropParams per image and at least one image, got {len(images)} images and "
                         f"{len(params)} params")
    crops = torch.cat([_resized_crop(image, p.window, size) for image, p in zip(images, params)]).clamp_(0, 1)
    device = crops.device
    flags = torch.tensor([[p.flip, p.grayscale, p.solarize] for p in params]).to(device)
    flip, grayscale, solarize = (_per_image(flags[:, i]) for i in range(3))
    crops = torch.where(flip, crops.flip(-1), crops)
    if any(p.jitter_order is not None for p in params):
        crops = _color_jitter(crops, params)
    crops = torch.where(grayscale, _luma(crops).expand_as(crops), crops)
    blurred = [b for b, p in enumerate(params) if p.blur_sigma > 0]
    if blurred:
        index = torch.tensor(blurred).to(device)
        crops[index] = gaussian_blur(crops[index], [params[b].blur_sigma for b in blurred])
    crops = torch.where(solarize & (crops >= recipe.solarize_threshold / 255), 1 - crops, crops)
    mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
    return ((crops - mean) / std).to(dtype)

