"""The DALI graph of the DINO multi-crop augmentation (one image in, 2 global + N local crops out).

This lives in its own file because DALI conditionals (`if` on per-sample random flags) rewrite the pipeline
function from its source code. The loader around it is `fastdino.data.dali.DaliMultiCropLoader`; the semantics and
their measured differences from the torchvision reference are documented there.

Per crop slot: random crop window (torchvision's RandomResizedCrop rule) -> bicubic antialiased resize (uint8) ->
colour jitter p 0.8 and grayscale p 0.2, folded into one linear colour transform (float) -> Gaussian blur (slot
probability, sigma ~ U(0.1, 2)) -> solarize (second global crop only, p 0.2) -> flip p 0.5 + ImageNet normalization
+ HWC->CHW + cast, in one crop_mirror_normalize.
"""
from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, math as dmath, pipeline_def, types
from nvidia.dali.data_node import DataNode

from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Pixels >= threshold are inverted (PIL ImageOps.solarize / torchvision RandomSolarize(threshold=128)).
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class MultiCropRecipe:
    """Every number of the DINO v1 multi-crop recipe; the defaults are the paper's.

    Blur and solarize probabilities are per slot kind: (first global, second global, locals). DINO v1 blurs with
    1.0 / 0.1 / 0.5 (dinov2/dinov3 swap the global values by mistake; fastdino follows v1).
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
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops_number

    def slot(self, index: int) -> tuple[int, tuple[float, float], float, float]:
        """(size, area scale, blur p, solarize p) of crop slot `index` (0, 1 global; 2.. local)."""
        kind = min(index, 2)
        if index < 2:
            return self.global_crop_size, self.global_crops_scale, self.blur_p[kind], self.solarize_p[kind]
        return self.local_crop_size, self.local_crops_scale, self.blur_p[kind], self.solarize_p[kind]


def _uniform_factor(strength: float, apply):
    """torchvision ColorJitter factor U(1 - strength, 1 + strength) where `apply` is 1, else exactly 1."""
    if strength == 0:
        return 1.0
    factor = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return 1.0 + apply * (factor - 1.0)


def _colour_jitter_and_grayscale(crop, recipe: MultiCropRecipe, device: str):
    """uint8 HWC crop -> uint8 HWC after ColorJitter (p jitter_p) then RandomGrayscale (p grayscale_p).

    All four jitters are linear maps in YIQ space that commute (brightness scales everything; contrast scales around
    the mean luma; saturation scales the chroma I, Q; hue rotates I, Q -- DALI's hsv rotates in YIQ), and grayscale
    after them equals saturation 0. So the random order of torchvision changes nothing except intermediate uint8
    clamping, and the whole thing is two ops with a single final rounding.
    """
    apply = fn.cast(fn.random.coin_flip(probability=recipe.jitter_p), dtype=types.FLOAT)
    keep_colour = 1.0 - fn.cast(fn.random.coin_flip(probability=recipe.grayscale_p), dtype=types.FLOAT)
    brightness = _uniform_factor(recipe.brightness, apply)
    contrast = _uniform_factor(recipe.contrast, apply)
    saturation = _uniform_factor(recipe.saturation, apply) * keep_colour
    hue_degrees = apply * fn.random.uniform(range=[-recipe.hue * 360.0, recipe.hue * 360.0]) if recipe.hue else 0.0
    if device == "gpu":  # arithmetic with the GPU crop needs GPU operands
        brightness, contrast = (f.gpu() if isinstance(f, DataNode) else f for f in (brightness, contrast))
    channel_means = fn.reductions.mean(crop, axes=[0, 1], dtype=types.FLOAT)
    mean_luma = (LUMA_WEIGHTS[0] * channel_means[0] + LUMA_WEIGHTS[1] * channel_means[1]
                 + LUMA_WEIGHTS[2] * channel_means[2])
    # torchvision adjust_contrast blends with the mean of the grayscale image (not with mid-grey as color_twist does)
    pivoted = brightness * (contrast * crop + (1.0 - contrast) * mean_luma)
    coloured = fn.hsv(pivoted, hue=hue_degrees, saturation=saturation, dtype=types.FLOAT)
    return fn.cast(dmath.clamp(coloured, 0.0, 255.0), dtype=types.UINT8)


def _solarize(crop):
    """Invert pixels >= SOLARIZE_THRESHOLD: an exact 256-entry lookup table on uint8."""
    return fn.lookup_table(crop, keys=list(range(256)), dtype=types.UINT8,
                           values=[v if v < SOLARIZE_THRESHOLD else 255 - v for v in range(256)])


def _augment_slot(image, image_shape, slot: int, recipe: MultiCropRecipe, device: str, crop_dtype,
                  return_params: bool):
    """One crop slot: returns the CHW normalized crop, plus (anchor, shape, flip, blur sigma) when return_params.

    blur sigma is reported as 0 when the slot was not blurred.
    """
    size, scale, blur_p, solarize_p = recipe.slot(slot)
    anchor, window = fn.random_crop_generator(image_shape, random_area=list(scale),
                                              random_aspect_ratio=list(recipe.aspect_ratio), num_attempts=10)
    roi_start = fn.cast(anchor, dtype=types.FLOAT)
    roi_end = roi_start + fn.cast(window, dtype=types.FLOAT)
    crop = fn.resize(image, size=[size, size], roi_start=roi_start, roi_end=roi_end, interp_type=types.INTERP_CUBIC,
                     antialias=True, dtype=types.UINT8)
    crop = _colour_jitter_and_grayscale(crop, recipe, device)
    sigma = fn.random.uniform(range=list(recipe.blur_sigma))
    if blur_p >= 1.0:
        crop = fn.gaussian_blur(crop, sigma=sigma)
    elif blur_p > 0.0:
        blurred = fn.random.coin_flip(probability=blur_p, dtype=types.BOOL)
        if blurred:
            crop = fn.gaussian_blur(crop, sigma=sigma)
        else:
            crop = crop
        sigma = sigma * fn.cast(blurred, dtype=types.FLOAT)
    else:
        sigma = sigma * 0.0
    if solarize_p > 0.0:
        if fn.random.coin_flip(probability=solarize_p, dtype=types.BOOL):
            crop = _solarize(crop)
        else:
            crop = crop
    flip = fn.random.coin_flip(probability=recipe.flip_p)
    out = fn.crop_mirror_normalize(crop, mirror=flip, dtype=crop_dtype, output_layout="CHW",
                                   mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std])
    if return_params:
        return [out, anchor, window, flip, sigma]
    return [out]


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(reader: dict, recipe: MultiCropRecipe, decode_device: str, crop_dtype,
                       return_params: bool = False):
    """Outputs: labels, then per crop slot the crop [3, S, S] (crop_dtype) -- and, when return_params,
    the crop anchor [2] (y, x), window [2] (h, w), flip (0/1) and blur sigma (0 if none) of that slot.

    `reader`: {"kind": "file", "files": [...], "labels": [...]} or {"kind": "webdataset", **webdataset kwargs}.
    decode_device: "cpu" or "mixed" (nvJPEG, hardware decoder where present); with "mixed", crops stay on the GPU.
    """
    kind = reader["kind"]
    options = {key: value for key, value in reader.items() if key != "kind"}
    if kind == "file":
        encoded, labels = fn.readers.file(**options, name="reader")
    else:
        encoded, labels = fn.readers.webdataset(**options, name="reader")
    device = "gpu" if decode_device == "mixed" else "cpu"
    # decode once for all crops; the crop window needs the (EXIF-rotated) shape on the CPU, read from the header
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    image_shape = fn.peek_image_shape(encoded)
    outputs = [labels]
    for slot in range(recipe.num_crops):
        outputs.extend(_augment_slot(image, image_shape, slot, recipe, device, crop_dtype, return_params))
    return tuple(outputs)
