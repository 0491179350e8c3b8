"""The random choices of the GPU-decode loader's crops, drawn as torchvision draws them.

Every image draws from its own torch.Generator, seeded with `sample_seed(seed, epoch, index)`, with the same calls
in the same order as the transforms of `augment.DataAugmentationDINO` draw from torch's global generator under
`MultiCropLoader`: same seed and recipe, same crop windows, flips, jitter factors and order, grayscale, blur sigmas
and solarization. The recipe's crop slots (`recipe.CropSlot`) say what to draw; `gpu_decode_augment` applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fastdino.data.recipe import CROP_ATTEMPTS, CropSlot, MultiCropRecipe


@dataclass(frozen=True)
class CropParams:
    """The random choices of one crop of one image.

    window: (top, left, height, width) in source pixels. jitter_order: the ColorJitter operations applied (0
    brightness, 1 contrast, 2 saturation, 3 hue; those of strength 0 are left out, as ColorJitter does) in application
    order, or None when the jitter is not applied. blur_sigma: 0 when not blurred.
    """

    window: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...] | None
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float
    solarize: bool


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _coin(generator: torch.Generator, p: float) -> bool:
    return bool(torch.rand(1, generator=generator) < p)


def draw_crop_window(height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                     aspect_ratio: tuple[float, float] = MultiCropRecipe.aspect_ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w): RandomResizedCrop.get_params with the same draws, from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(aspect_ratio))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(aspect_ratio):
        w, h = width, int(round(width / min(aspect_ratio)))
    elif in_ratio > max(aspect_ratio):
        h, w = height, int(round(height * max(aspect_ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_jitter(generator: torch.Generator,
                strengths: tuple[float, float, float, float] = MultiCropRecipe().jitter_strengths,
                ) -> tuple[tuple[int, ...], float, float, float, float]:
    """(order, brightness, contrast, saturation, hue): ColorJitter(*strengths).get_params' draws. An operation of
    strength 0 draws nothing, gets its identity factor and is left out of the order, as ColorJitter does."""
    order = tuple(op for op in torch.randperm(4, generator=generator).tolist() if strengths[op] > 0)
    *blends, hue = strengths
    factors = [_uniform(generator, max(0.0, 1 - strength), 1 + strength) if strength > 0 else 1.0
               for strength in blends]
    return (order, *factors, _uniform(generator, -hue, hue) if hue > 0 else 0.0)


def draw_crop_params(height: int, width: int, slot: CropSlot, generator: torch.Generator) -> CropParams:
    """One crop's choices, drawn in the order DataAugmentationDINO's transforms draw them (`augment.slot_transform`:
    no solarization draw where its probability is 0)."""
    window = draw_crop_window(height, width, slot.scale, generator, slot.aspect_ratio)
    flip = _coin(generator, slot.flip_p)
    jitter = draw_jitter(generator, slot.jitter_strengths) \
        if not slot.jitter_p < torch.rand(1, generator=generator) else None
    grayscale = _coin(generator, slot.grayscale_p)
    blur_sigma = _uniform(generator, *slot.blur_sigma) if _coin(generator, slot.blur_p) else 0.0
    solarize = _coin(generator, slot.solarize_p) if slot.solarize_p > 0 else False
    order, brightness, contrast, saturation, hue = jitter if jitter is not None else (None, 1.0, 1.0, 1.0, 0.0)
    return CropParams(window, flip, order, brightness, contrast, saturation, hue, grayscale, blur_sigma, solarize)


def draw_image_params(height: int, width: int, slots: Sequence[CropSlot], seed: int) -> list[CropParams]:
    """The choices of every slot for one image [height x width], from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [draw_crop_params(height, width, slot, generator) for slot in slots]
