"""The DINO multi-crop augmentation on the CPU, about twice as fast per core as `augment.DataAugmentationDINO`, with
the same random draws and the same distributions; crops leave as uint8 and are normalized on the training device.

Per image: the draws first (`gpu_decode_draws.draw_crop_params` from torch's global generator, the very numbers the
reference's transforms draw under `MultiCropLoader`'s per-sample seeding), then one decode, reduced in the JPEG's DCT
domain by the largest factor 2, 4 or 8 that every crop window of the image is downscaled by anyway (PIL's `draft`;
`from_file`), then per crop: torch's uint8 antialiased bicubic resize (PIL's filter: within 1 grey level of PIL on
under 1 % of the pixels), flip, and from there PIL's own arithmetic, as the reference: ColorJitter's operations in
the drawn order, grayscale, GaussianBlur, solarization. What differs from the reference: the resize's rounding, and
where a draft applies, the DCT downscale and windows rounded to whole pixels of the reduced image (at most half a
reduced pixel per edge); tests/test_fast_augment.py measures both with the two-sample tests of the DALI path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from fastdino.data.datasets import _DECODE_ERRORS, rgb_of
from fastdino.data.gpu_decode_draws import CropParams, draw_crop_params
from fastdino.data.recipe import BRIGHTNESS, CONTRAST, SATURATION, MultiCropRecipe, recipe_of

DRAFT_FACTORS = (8, 4, 2)  # the reductions libjpeg's DCT scaling offers (besides 1)


def draft_factor(params: Sequence[CropParams], sizes: Sequence[int]) -> int:
    """The largest JPEG draft reduction (8, 4, 2, else 1) that no crop window is downscaled by less than: decoding at
    1/factor of the size then leaves every crop a resize that still reduces (or keeps) its window."""
    least = min(min(p.window[2], p.window[3]) / size for p, size in zip(params, sizes))
    return next((factor for factor in DRAFT_FACTORS if factor <= least), 1)


def _resized_crop(pixels: torch.Tensor, window: tuple[int, int, int, int], size: int, reduction: int,
                  flip: bool) -> Image.Image:
    """The window (source pixels) of uint8 pixels [1, 3, H, W] decoded at 1/reduction, resized to size x size
    (antialiased bicubic, PIL's filter), flipped when asked, as a PIL RGB image."""
    top, left, height, width = window
    if reduction > 1:  # the window's edges on the reduced grid, rounded to whole pixels
        bottom, right = round((top + height) / reduction), round((left + width) / reduction)
        top, left = round(top / reduction), round(left / reduction)
        height, width = bottom - top, right - left
    crop = F.interpolate(pixels[:, :, top:top + height, left:left + width], size=(size, size), mode="bicubic",
                         antialias=True)[0]
    if flip:
        crop = crop.flip(-1)
    return Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy())


def _hue(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's adjust_hue of a PIL image: PIL's uint8 hue plus np.int32(hue * 255), wrapping around."""
    shift = int(np.int32(hue * 255))
    hue_band, saturation, value = image.convert("HSV").split()
    hue_band = hue_band.point([(level + shift) % 256 for level in range(256)])
    return Image.merge("HSV", (hue_band, saturation, value)).convert("RGB")


_ENHANCERS = {BRIGHTNESS: ImageEnhance.Brightness, CONTRAST: ImageEnhance.Contrast, SATURATION: ImageEnhance.Color}


def _augment(image: Image.Image, p: CropParams, solarize_threshold: int) -> torch.Tensor:
    """The reference's steps after the flip, on a PIL crop: jitter, grayscale, blur, solarize -> uint8 [3, S, S]."""
    factors = (p.brightness, p.contrast, p.saturation)
    for operation in p.jitter_order or ():
        image = _hue(image, p.hue) if operation not in _ENHANCERS else \
            _ENHANCERS[operation](image).enhance(factors[operation])
    if p.grayscale:
        image = image.convert("L").convert("RGB")
    if p.blur_sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    crop = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if p.solarize:
        crop = torch.where(crop >= solarize_threshold, 255 - crop, crop)
    return crop


class FastMultiCrop:
    """PIL image (or, through `from_file`, an image file) -> the recipe's crops, uint8 [3, S, S] (two globals, then
    the locals); `normalize_crops` turns a batch of them into the reference's float input on the training device.

    `recipe`, or the paper's recipe with the five crop settings (DataAugmentationDINO's signature). draft=False
    decodes every JPEG at full size.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = MultiCropRecipe.global_crops_scale,
                 local_crops_scale: tuple[float, float] = MultiCropRecipe.local_crops_scale,
                 local_crops_number: int = MultiCropRecipe.local_crops_number,
                 global_crop_size: int = MultiCropRecipe.global_crop_size,
                 local_crop_size: int = MultiCropRecipe.local_crop_size, *, recipe: MultiCropRecipe | None = None,
                 draft: bool = True):
        self.recipe = recipe_of(recipe, global_crops_scale, local_crops_scale, local_crops_number, global_crop_size,
                                local_crop_size)
        self.slots = self.recipe.slots()
        self.draft = draft

    def draw(self, width: int, height: int) -> list[CropParams]:
        """Every slot's random choices for an image of this size, from torch's global generator, in the
        reference's order."""
        return [draw_crop_params(height, width, slot, torch.default_generator) for slot in self.slots]

    def crops(self, image: Image.Image, params: Sequence[CropParams], reduction: int = 1) -> list[torch.Tensor]:
        """The crops of an RGB image decoded at 1/reduction of the size the windows of `params` refer to."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # channels-last: the fast kernel
        threshold = self.recipe.solarize_threshold
        return [_augment(_resized_crop(pixels, p.window, slot.size, reduction, p.flip), p, threshold)
                for p, slot in zip(params, self.slots)]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return self.crops(image, self.draw(*image.size))

    def from_file(self, path: str | Path) -> list[torch.Tensor]:
        """Decode the file (datasets.load_rgb's mode rule) at the draft reduction its drawn windows allow, and crop.

        When decoding fails, torch's generator is put back as it was, so the next sample tried draws as if first.
        """
        state = torch.default_generator.get_state()
        try:
            with Image.open(path) as file:
                params = self.draw(*file.size)
                reduction = draft_factor(params, [slot.size for slot in self.slots]) if self.draft else 1
                if reduction > 1 and file.draft(None, (file.width // reduction, file.height // reduction)) is None:
                    reduction = 1  # not a JPEG: decoded at full size
                image = rgb_of(file)
        except _DECODE_ERRORS:
            torch.default_generator.set_state(state)
            raise
        return self.crops(image, params, reduction)


def normalize_crops(crops: Sequence[torch.Tensor], recipe: MultiCropRecipe,
                    dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """uint8 crop batches [B, 3, S, S] -> the reference's normalized input (ToTensor, then Normalize with the
    recipe's mean and std), in `dtype` on the crops' device: run it there, after the copy of a quarter of the
    bytes."""
    mean = torch.tensor(recipe.mean, device=crops[0].device).view(1, 3, 1, 1) * 255
    std = torch.tensor(recipe.std, device=crops[0].device).view(1, 3, 1, 1) * 255
    return [((crop.float() - mean) / std).to(dtype) for crop in crops]
