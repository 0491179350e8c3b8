"""The DINO multi-crop augmentation on the CPU (PIL + torchvision), as in Caron et al. 2021.

This is the reference path the DALI pipeline is measured against, so it keeps the paper's recipe and distributions:
PIL bicubic resized crops, colour jitter, PIL's Gaussian blur (its radius is the sigma), PIL solarization.
All randomness is drawn from torch's global CPU generator, so seeding that generator per sample (the loader does)
fixes every crop.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _coin(p: float) -> bool:
    """True with probability p, drawn from torch's global generator."""
    return bool(torch.rand(()) < p)


class RandomGaussianBlur:
    """With probability p, blur a PIL image with PIL's Gaussian filter, sigma uniform in [sigma_min, sigma_max]."""

    def __init__(self, p: float, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.p, self.sigma_min, self.sigma_max = p, sigma_min, sigma_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _coin(self.p):
            return image
        sigma = float(torch.empty(()).uniform_(self.sigma_min, self.sigma_max))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma=[{self.sigma_min}, {self.sigma_max}])"


def check_crop_scale(name: str, scale: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in scale)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"{name} must be (min, max) area fractions with 0 < min <= max <= 1, got {tuple(scale)}")
    return low, high


def check_multicrop_settings(global_crops_scale, local_crops_scale, local_crops_number: int, global_crop_size: int,
                             local_crop_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """ValueError naming the first bad setting; returns the two scale ranges as floats."""
    global_crops_scale = check_crop_scale("global_crops_scale", global_crops_scale)
    local_crops_scale = check_crop_scale("local_crops_scale", local_crops_scale)
    if int(local_crops_number) != local_crops_number or local_crops_number < 0:
        raise ValueError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
    for name, size in (("global_crop_size", global_crop_size), ("local_crop_size", local_crop_size)):
        if int(size) != size or size <= 0:
            raise ValueError(f"{name} must be a positive integer (pixels), got {size!r}")
    return global_crops_scale, local_crops_scale


class DataAugmentationDINO:
    """PIL image -> list of 2 + local_crops_number normalized crops, float32 tensors [3, H, W].

    Crop 0: global, blur always. Crop 1: global, blur p 0.1, solarize p 0.2. Crops 2..: local, blur p 0.5.
    Every crop: bicubic RandomResizedCrop, horizontal flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale p 0.2, then ImageNet mean/std normalization.
    """

    def __init__(self, global_crops_scale: tuple[float, float] = (0.4, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96):
        global_crops_scale, local_crops_scale = check_multicrop_settings(
            global_crops_scale, local_crops_scale, local_crops_number, global_crop_size, local_crop_size
        )
        self.local_crops_number = int(local_crops_number)

        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                   p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def resized_crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(int(size), scale=scale,
                                                interpolation=transforms.InterpolationMode.BICUBIC)

        self.global_transform1 = transforms.Compose([
            resized_crop(global_crop_size, global_crops_scale), flip_and_color_jitter,
            RandomGaussianBlur(p=1.0), normalize,
        ])
        self.global_transform2 = transforms.Compose([
            resized_crop(global_crop_size, global_crops_scale), flip_and_color_jitter,
            RandomGaussianBlur(p=0.1), transforms.RandomSolarize(threshold=128, p=0.2), normalize,
        ])
        self.local_transform = transforms.Compose([
            resized_crop(local_crop_size, local_crops_scale), flip_and_color_jitter,
            RandomGaussianBlur(p=0.5), normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global1={self.global_transform1}, global2={self.global_transform2}, "
                f"local={self.local_transform} x {self.local_crops_number})")
