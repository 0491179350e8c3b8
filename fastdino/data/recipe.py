"""The DINO multi-crop recipe, written once: how many crops of which size, area and aspect ratio, and the probability
and strength of every augmentation in each crop slot.

The three loader paths read it and only say how to compute it: `augment.DataAugmentationDINO` (PIL + torchvision
transforms), the DALI graph (`dali_draws`, `dali_pipeline`) and the GPU-decode loader (`gpu_decode_draws`,
`gpu_decode_augment`). Change a number here and every path follows (tests/test_multicrop_recipe.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Not settings: the fixed behaviour of the torchvision transforms every path reproduces.
CROP_ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many windows before its central fallback
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's operations, numbered as in ColorJitter.forward


@dataclass(frozen=True)
class CropSlot:
    """Everything that makes one crop of an image, in the order it is applied: a resized crop to `size` of an area
    fraction in `scale` and an aspect ratio in `aspect_ratio`, horizontal flip, colour jitter (strengths of
    brightness, contrast, saturation, hue, as ColorJitter takes them), grayscale, Gaussian blur with sigma uniform in
    `blur_sigma`, solarization of levels >= `solarize_threshold` (of 0..255), normalization by `mean` and `std`."""

    size: int
    scale: tuple[float, float]
    aspect_ratio: tuple[float, float]
    flip_p: float
    jitter_p: float
    jitter_strengths: tuple[float, float, float, float]
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    solarize_p: float
    solarize_threshold: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _range(name: str, values, high: float) -> tuple[float, float]:
    """(min, max) as floats with 0 < min <= max <= high; ValueError naming `name` otherwise."""
    low, top = (float(v) for v in values)
    if not 0.0 < low <= top <= high:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= {high}, got {tuple(values)}")
    return low, top


def _number(name: str, value: float, low: float, high: float, integer: bool = False) -> float | int:
    """`value` as a float (or int) in [low, high]; ValueError naming `name` otherwise."""
    if not low <= value <= high or (integer and int(value) != value):
        bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} {bounds}, got {value!r}")
    return int(value) if integer else float(value)


def _probabilities(name: str, values) -> tuple[float, float, float]:
    """One probability per slot kind (first global, second global, locals)."""
    values = tuple(values)
    if len(values) != 3:
        raise ValueError(f"{name} must be 3 probabilities (first global, second global, locals), got {values}")
    return tuple(_number(name, p, 0.0, 1.0) for p in values)


def _rgb(name: str, values, positive: bool = False) -> tuple[float, float, float]:
    """Three floats (R, G, B), all > 0 when `positive`."""
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (positive and min(values) <= 0):
        raise ValueError(f"{name} must be 3 values (R, G, B){' > 0' if positive else ''}, got {values}")
    return values


@dataclass(frozen=True)
class MultiCropRecipe:
    """Every number of the DINO v1 multi-crop recipe; the defaults are the paper's.

    Crop slots: 0 and 1 global, 2 .. 1 + local_crops_number local. Blur and solarize probabilities are per slot kind:
    (first global, second global, locals). DINO v1 blurs with 1.0 / 0.1 / 0.5 (dinov2/dinov3 swap the global values
    by mistake; fastdino follows v1) and solarizes the second global crop only. `slots()` is the per-slot view the
    loader paths read.
    """
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    global_crop_size: int = 224
    local_crop_size: int = 96
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        """Check every value (ValueError naming the first bad one) and store it as a plain float, int or tuple."""
        inf = float("inf")
        normalized = dict(
            global_crops_scale=_range("global_crops_scale", self.global_crops_scale, 1.0),
            local_crops_scale=_range("local_crops_scale", self.local_crops_scale, 1.0),
            local_crops_number=_number("local_crops_number", self.local_crops_number, 0, inf, integer=True),
            global_crop_size=_number("global_crop_size (pixels)", self.global_crop_size, 1, inf, integer=True),
            local_crop_size=_number("local_crop_size (pixels)", self.local_crop_size, 1, inf, integer=True),
            aspect_ratio=_range("aspect_ratio", self.aspect_ratio, inf),
            flip_p=_number("flip_p", self.flip_p, 0.0, 1.0),
            jitter_p=_number("jitter_p", self.jitter_p, 0.0, 1.0),
            brightness=_number("brightness", self.brightness, 0.0, inf),
            contrast=_number("contrast", self.contrast, 0.0, inf),
            saturation=_number("saturation", self.saturation, 0.0, inf),
            hue=_number("hue", self.hue, 0.0, 0.5),  # ColorJitter's bound
            grayscale_p=_number("grayscale_p", self.grayscale_p, 0.0, 1.0),
            blur_p=_probabilities("blur_p", self.blur_p),
            blur_sigma=_range("blur_sigma", self.blur_sigma, inf),
            solarize_p=_probabilities("solarize_p", self.solarize_p),
            solarize_threshold=_number("solarize_threshold", self.solarize_threshold, 0, 256, integer=True),
            mean=_rgb("mean", self.mean),
            std=_rgb("std", self.std, positive=True),
        )
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # the way to set a field of a frozen dataclass

    @classmethod
    def from_settings(cls, global_crops_scale: tuple[float, float], local_crops_scale: tuple[float, float],
                      local_crops_number: int, global_crop_size: int, local_crop_size: int) -> MultiCropRecipe:
        """The paper's recipe with the crop settings a run chooses (the config's `data.*` of the same names)."""
        return cls(global_crops_scale=global_crops_scale, local_crops_scale=local_crops_scale,
                   local_crops_number=local_crops_number, global_crop_size=global_crop_size,
                   local_crop_size=local_crop_size)

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops_number

    @property
    def jitter_strengths(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue), indexed by the ColorJitter operation ids."""
        return self.brightness, self.contrast, self.saturation, self.hue

    def slots(self) -> list[CropSlot]:
        """The crop slots in output order: the two globals, then the locals."""
        def slot(kind: int, size: int, scale: tuple[float, float]) -> CropSlot:
            return CropSlot(size=size, scale=scale, aspect_ratio=self.aspect_ratio, flip_p=self.flip_p,
                            jitter_p=self.jitter_p, jitter_strengths=self.jitter_strengths,
                            grayscale_p=self.grayscale_p, blur_p=self.blur_p[kind], blur_sigma=self.blur_sigma,
                            solarize_p=self.solarize_p[kind], solarize_threshold=self.solarize_threshold,
                            mean=self.mean, std=self.std)

        return [slot(0, self.global_crop_size, self.global_crops_scale),
                slot(1, self.global_crop_size, self.global_crops_scale),
                *[slot(2, self.local_crop_size, self.local_crops_scale)] * self.local_crops_number]

    def groups(self) -> list[tuple[str, range]]:
        """The slots of one size: the globals, then the locals (when there are any)."""
        groups = [("global", range(0, 2))]
        if self.local_crops_number:
            groups.append(("local", range(2, self.num_crops)))
        return groups


def recipe_of(recipe: MultiCropRecipe | None, global_crops_scale: tuple[float, float],
              local_crops_scale: tuple[float, float], local_crops_number: int, global_crop_size: int,
              local_crop_size: int) -> MultiCropRecipe:
    """The recipe DataAugmentationDINO is asked for: `recipe`, or else the paper's with the five crop settings (its
    keyword form, the reference's signature). ValueError when both are given, since one of them would be ignored."""
    from_settings = MultiCropRecipe.from_settings(global_crops_scale, local_crops_scale, local_crops_number,
                                                  global_crop_size, local_crop_size)
    if recipe is None:
        return from_settings
    if from_settings != MultiCropRecipe():
        raise ValueError("pass either recipe= or the crop settings (global_crops_scale, local_crops_scale, "
                         "local_crops_number, global_crop_size, local_crop_size), not both")
    return recipe


def multicrop_slots(global_crops_scale: tuple[float, float] = MultiCropRecipe.global_crops_scale,
                    local_crops_scale: tuple[float, float] = MultiCropRecipe.local_crops_scale,
                    local_crops_number: int = MultiCropRecipe.local_crops_number,
                    global_crop_size: int = MultiCropRecipe.global_crop_size,
                    local_crop_size: int = MultiCropRecipe.local_crop_size) -> list[CropSlot]:
    """The slots of the paper's recipe with these crop settings (the per-slot draws of tests and diagnostics)."""
    return MultiCropRecipe.from_settings(global_crops_scale, local_crops_scale, local_crops_number, global_crop_size,
                                         local_crop_size).slots()
