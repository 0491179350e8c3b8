"""The DINO multi-crop augmentation: shapes, normalization, and the per-crop blur/solarization probabilities.

Probabilities are measured from the pictures themselves, on synthetic images built so that each effect is visible
whatever the colour jitter did, and compared with the recipe within 4 binomial standard deviations.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fastdino.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
SIZE = 32


def _pixels(crop: torch.Tensor) -> torch.Tensor:
    """Undo the normalization: [3, H, W] back to 0..255."""
    return (crop * STD + MEAN) * 255


def _rate_matches(hits: int, trials: int, p: float) -> bool:
    return abs(hits / trials - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) / trials)


def test_crop_count_sizes_and_dtype():
    torch.manual_seed(0)
    augment = DataAugmentationDINO(local_crops_number=3, global_crop_size=24, local_crop_size=12)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    crops = augment(image)
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    assert len(DataAugmentationDINO(local_crops_number=0, global_crop_size=8)(image)) == 2


def test_constant_images_normalize_as_by_hand():
    torch.manual_seed(0)
    augment = DataAugmentationDINO(local_crops_number=2, global_crop_size=16, local_crop_size=8)
    # Black stays black under every jitter, blur and solarization: the crop is exactly -mean/std.
    for crop in augment(Image.new("RGB", (20, 20), 0)):
        expected = (torch.zeros_like(crop) - MEAN) / STD
        torch.testing.assert_close(crop, expected)
    # Grey stays grey and flat; only brightness (factor 0.6..1.4) may change it in crop 0.
    for _ in range(10):
        crop = augment(Image.new("RGB", (20, 20), (100, 100, 100)))[0]
        pixels = _pixels(crop)
        assert torch.allclose(pixels, pixels[0, 0, 0], atol=1e-3)
        assert 60 - 1e-3 <= pixels[0, 0, 0] <= 140 + 1e-3


CHECKER_MEAN, CHECKER_AMPLITUDE, FLAT = 40, 16, 70


def _checker_and_flat() -> Image.Image:
    """Top half: 1-pixel checkerboard 40 +- 16 (blur erases it); bottom half flat 70 (blur leaves it).

    Grey, so hue, saturation and grayscale change nothing; dark enough that no jitter factor clips and that
    solarization (threshold 128) never applies.
    """
    rows, cols = np.indices((SIZE, SIZE))
    image = np.where(rows < SIZE // 2, CHECKER_MEAN + CHECKER_AMPLITUDE * (-1.0) ** (rows + cols), FLAT)
    image = image.astype(np.uint8)
    return Image.fromarray(np.stack([image] * 3, axis=-1))


def _checker_contrast(pixels: np.ndarray) -> float:
    """Checkerboard amplitude over the checker-to-flat step; both scale alike under brightness and contrast."""
    rows, cols = np.indices(pixels.shape)
    sign = (-1.0) ** (rows + cols)
    checker = pixels[2:8, 2:-2]
    amplitude = abs((checker * sign[2:8, 2:-2]).mean())
    step = pixels[26:30, 2:-2].mean() - checker.mean()
    return amplitude / step


def _blurred(pixels: np.ndarray) -> bool:
    return _checker_contrast(pixels) < 0.5 * CHECKER_AMPLITUDE / (FLAT - CHECKER_MEAN)


def test_blur_probability_per_crop_slot():
    # Whole-image crops at the native size: the geometry is the identity, so only the blur touches the pattern.
    augment = DataAugmentationDINO(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=1,
                                   global_crop_size=SIZE, local_crop_size=SIZE)
    image = _checker_and_flat()
    # PIL's blur erases the pattern only above some sigma; its share of sigma ~ U[0.1, 2] is measured on PIL itself.
    sigmas = np.linspace(0.1, 2.0, 381)
    erasing = np.mean([_blurred(np.asarray(image.filter(ImageFilter.GaussianBlur(float(s))))[..., 0].astype(float))
                       for s in sigmas])
    assert 0.5 < erasing < 1.0
    torch.manual_seed(0)
    trials = 300
    hits = np.zeros(3, dtype=int)
    for _ in range(trials):
        for slot, crop in enumerate(augment(image)):
            hits[slot] += _blurred(_pixels(crop)[0].numpy())
    for slot, p_blur in enumerate([1.0, 0.1, 0.5]):
        assert _rate_matches(hits[slot], trials, p_blur * erasing), (slot, hits[slot] / trials, p_blur * erasing)


def test_blur_sigma_is_uniform_between_bounds(monkeypatch):
    sigmas = []
    real_blur = ImageFilter.GaussianBlur

    def recording_blur(radius):
        sigmas.append(radius)
        return real_blur(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", recording_blur)
    torch.manual_seed(0)
    augment = DataAugmentationDINO(local_crops_number=0, global_crop_size=4)
    for _ in range(300):
        augment(Image.new("RGB", (4, 4)))
    sigmas = np.array(sigmas)
    assert _rate_matches(len(sigmas) - 300, 300, 0.1)  # crop 0 always, crop 1 with p 0.1
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert abs(sigmas.mean() - 1.05) < 4 * (1.9 / math.sqrt(12)) / math.sqrt(len(sigmas))
    assert _rate_matches(int(np.sum(sigmas < 0.575)), len(sigmas), 0.25)  # 4 standard errors, as the rest


def test_solarization_only_on_second_global_crop():
    # White stays >= 153 under any brightness factor; solarized it drops to <= 102.
    augment = DataAugmentationDINO(local_crops_number=1, global_crop_size=8, local_crop_size=8)
    image = Image.new("RGB", (12, 12), (255, 255, 255))
    torch.manual_seed(1)
    trials = 600
    hits = np.zeros(3, dtype=int)
    for _ in range(trials):
        for slot, crop in enumerate(augment(image)):
            brightest = _pixels(crop).max().item()
            assert brightest <= 102.5 or brightest >= 152.5
            hits[slot] += brightest < 128
    assert hits[0] == hits[2] == 0
    assert _rate_matches(hits[1], trials, 0.2), hits[1] / trials


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="global_crops_scale"):
        DataAugmentationDINO(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_scale"):
        DataAugmentationDINO(local_crops_scale=(0.0, 0.4))
    with pytest.raises(ValueError, match="local_crops_number"):
        DataAugmentationDINO(local_crops_number=-1)
    with pytest.raises(ValueError, match="local_crop_size"):
        DataAugmentationDINO(local_crop_size=0)
