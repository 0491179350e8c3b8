"""The DINO multi-crop augmentation on the CPU (PIL + torchvision), as in Caron et al. 2021.

This is the reference path the DALI pipeline is measured against, so it keeps the paper's distributions: PIL bicubic
resized crops, colour jitter, PIL's Gaussian blur (its radius is the sigma), PIL solarization. What each crop slot
gets (sizes, areas, probabilities, strengths) is read from a `recipe.MultiCropRecipe`; this module only says how.
All randomness is drawn from torch's global CPU generator, so seeding that generator per sample (the loader does)
fixes every crop.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from fastdino.data.recipe import CropSlot, MultiCropRecipe, recipe_of


def _coin(p: float) -> bool:
    """True with probability p, drawn from torch's global generator."""
    return bool(torch.rand(()) < p)


class RandomGaussianBlur:
    """With probability p, blur a PIL image with PIL's Gaussian filter, sigma uniform in sigma = (min, max)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p = p
        self.sigma_min, self.sigma_max = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _coin(self.p):
            return image
        sigma = float(torch.empty(()).uniform_(self.sigma_min, self.sigma_max))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma=[{self.sigma_min}, {self.sigma_max}])"


def slot_transform(slot: CropSlot) -> transforms.Compose:
    """PIL image -> the normalized float32 crop [3, size, size] of one crop slot, drawing its random numbers in the
    order `gpu_decode_draws` replays them. Solarization is left out where its probability is 0, so that it draws
    nothing there."""
    steps = [
        transforms.RandomResizedCrop(slot.size, scale=slot.scale, ratio=slot.aspect_ratio,
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=slot.flip_p),
        transforms.RandomApply([transforms.ColorJitter(*slot.jitter_strengths)], p=slot.jitter_p),
        transforms.RandomGrayscale(p=slot.grayscale_p),
        RandomGaussianBlur(slot.blur_p, slot.blur_sigma),
    ]
    if slot.solarize_p > 0:
        steps.append(transforms.RandomSolarize(threshold=slot.solarize_threshold, p=slot.solarize_p))
    steps += [transforms.ToTensor(), transforms.Normalize(slot.mean, slot.std)]
    return transforms.Compose(steps)


class DataAugmentationDINO:
    """PIL image -> list of the recipe's crops (two globals, then the locals), float32 tensors [3, H, W].

    `recipe` (a MultiCropRecipe), or else the paper's recipe with the five crop settings given here.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = MultiCropRecipe.global_crops_scale,
                 local_crops_scale: tuple[float, float] = MultiCropRecipe.local_crops_scale,
                 local_crops_number: int = MultiCropRecipe.local_crops_number,
                 global_crop_size: int = MultiCropRecipe.global_crop_size,
                 local_crop_size: int = MultiCropRecipe.local_crop_size, *, recipe: MultiCropRecipe | None = None):
        self.recipe = recipe_of(recipe, global_crops_scale, local_crops_scale, local_crops_number, global_crop_size,
                                local_crop_size)
        made = {slot: slot_transform(slot) for slot in dict.fromkeys(self.recipe.slots())}  # one per distinct slot
        self.slot_transforms = [made[slot] for slot in self.recipe.slots()]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.slot_transforms]

    def __repr__(self) -> str:
        groups = [(f"slots {[i for i, t in enumerate(self.slot_transforms) if t is transform]}: {transform}")
                  for transform in dict.fromkeys(self.slot_transforms)]
        return f"{type(self).__name__}({', '.join(groups)})"
