"""The DALI graph of the DINO multi-crop augmentation (one image in, 2 global + N local crops out), computing what the
torchvision reference (`augment.DataAugmentationDINO`, PIL images) computes, in PIL's own arithmetic.

Randomness: the graph draws nothing. Every random number of a sample is drawn on the host by `draw_augmentations`
from a generator seeded with that sample's seed (the loader passes `torch_loader.sample_seed(seed, epoch, index)`,
the torchvision loader's rule) and enters the graph through `fn.external_source`. So a sample's crops depend on its
seed only, not on its batch position, and a mid-epoch resume replays them exactly.

Per crop slot: crop window (RandomResizedCrop.get_params: 10 attempts drawn on the host, tested against the image
shape in the graph, central fallback) -> bicubic antialiased resize (uint8). The crops of one size (the globals; the
locals) are then stacked as frames of one FHWC sequence and every step runs on all of them with per-frame parameters,
a step that does not apply to a frame being given identity parameters (so the graph has no conditionals):
ColorJitter p 0.8 as ImageEnhance and torchvision's PIL adjust_hue do it, in torchvision's random order -> grayscale
p 0.2 (PIL's integer luma) -> PIL's GaussianBlur (three extended box passes per axis with its fixed-point rounding,
sigma ~ U(0.1, 2)) -> solarize -> per slot: flip + ImageNet normalization + HWC->CHW + cast in crop_mirror_normalize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from nvidia.dali import fn, math as dmath, pipeline_def, types
from nvidia.dali.data_node import DataNode
from PIL import Image

from fastdino.data.augment import IMAGENET_MEAN, IMAGENET_STD

# PIL's convert("L") (Convert.c, L24): L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
PIL_LUMA_WEIGHTS = (19595, 38470, 7471)
# Pixels >= threshold are inverted (PIL ImageOps.solarize / torchvision RandomSolarize(threshold=128)).
SOLARIZE_THRESHOLD = 128
CROP_ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many windows before its central fallback
BOX_PASSES = 3  # PIL's GaussianBlur: three extended box passes per axis
_FIXED_ONE = 1 << 24  # PIL's box blur weights are fixed-point with 24 fractional bits
# ColorJitter's operations, numbered as in torchvision's ColorJitter.forward.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# The blends applied before and after the hue step (torchvision's random order puts hue anywhere among the four).
_BLENDS_AROUND_HUE = 3


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

    def groups(self) -> list[tuple[str, range]]:
        """The crop slots processed together as one sequence: the globals, then the locals (when there are any)."""
        groups = [("global", range(0, 2))]
        if self.local_crops_number:
            groups.append(("local", range(2, self.num_crops)))
        return groups


# ---------------------------------------------------------------------------------------------------------------
# Host side: the random draws of each sample, and the per-frame parameters the graph reads.

# Uniforms drawn per crop slot, in this order (the layout of one sample's draw).
_UNIFORMS = {"area": CROP_ATTEMPTS, "log_ratio": CROP_ATTEMPTS, "offset": 2, "flip": 1, "jitter": 1, "order": 4,
             "factor": 4, "gray": 1, "blur": 1, "sigma": 1, "solarize": 1}
_COLUMNS = dict(zip(_UNIFORMS, np.split(np.arange(sum(_UNIFORMS.values())), np.cumsum(list(_UNIFORMS.values()))[:-1])))


def pil_box_blur(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r, ww, fw) of PIL's GaussianBlur(radius=sigma), computed in PIL's float32 and integer arithmetic.

    Each of PIL's passes (BoxBlur.c) sets out[x] = (ww * sum(in[x-r .. x+r]) + fw * (in[x-r-1] + in[x+r+1]) + 2**23)
    >> 24 with edges clamped; `_gaussian_blur_radius` turns sigma into the extended box radius r + fraction.
    """
    radius = np.asarray(sigma, dtype=np.float32)
    variance = radius * radius / np.float32(BOX_PASSES)
    length = np.sqrt(12.0 * variance.astype(np.float64) + 1.0).astype(np.float32)
    whole = np.floor((length.astype(np.float64) - 1.0) / 2.0).astype(np.float32)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
    fraction /= 6 * (variance - (whole + 1) * (whole + 1))
    box_radius = whole + fraction
    r = box_radius.astype(np.int64)
    ww = (np.float32(_FIXED_ONE) / (box_radius * 2 + 1)).astype(np.int64)
    fw = (_FIXED_ONE - (2 * r + 1) * ww) // 2
    return r, ww, fw


def blur_reach(recipe: MultiCropRecipe) -> int:
    """How far from a pixel a blur pass of the recipe reads: the box radius of its largest sigma, plus 1."""
    return int(pil_box_blur(np.array(max(recipe.blur_sigma)))[0]) + 1


def draw_augmentations(recipe: MultiCropRecipe, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """Every random parameter of the augmentation of the samples with these seeds, arrays [B, num_crops, ...].

    Each sample's uniforms come from a torch.Generator seeded with its seed, so they depend on nothing else. The
    distributions are torchvision's: RandomResizedCrop (area fraction, log aspect ratio of CROP_ATTEMPTS windows;
    offsets as U[0, 1) fractions of the free range), ColorJitter (`order`: the operation ids in the order applied,
    uniform over permutations as torch.randperm(4); `factor`: brightness, contrast, saturation U(max(0, 1 - s), 1 + s)
    and torchvision's hue_factor U(-h, h)), and the coins (flip, jitter, gray, solarize) and blur sigma (0: no blur).
    """
    generator = torch.Generator()
    per_sample = recipe.num_crops * sum(_UNIFORMS.values())
    uniforms = np.stack([torch.rand(per_sample, generator=generator.manual_seed(int(seed)), dtype=torch.float64)
                         .numpy() for seed in seeds]).reshape(len(seeds), recipe.num_crops, -1)

    def column(name: str) -> np.ndarray:
        values = uniforms[..., _COLUMNS[name]]
        return values[..., 0] if values.shape[-1] == 1 else values

    def between(low: np.ndarray | float, high: np.ndarray | float, u: np.ndarray) -> np.ndarray:
        return low + (high - low) * u

    slots = [recipe.slot(index) for index in range(recipe.num_crops)]
    scale_low, scale_high = (np.array([scale[k] for _, scale, _, _ in slots])[:, None] for k in (0, 1))
    log_ratio = np.log(np.array(recipe.aspect_ratio))
    factors = [between(max(0.0, 1.0 - strength), 1.0 + strength, column("factor")[..., k])
               for k, strength in enumerate((recipe.brightness, recipe.contrast, recipe.saturation))]
    factors.append(between(-recipe.hue, recipe.hue, column("factor")[..., HUE]))
    blurred = column("blur") < np.array([blur_p for _, _, blur_p, _ in slots])
    return {
        "area": between(scale_low, scale_high, column("area")),
        "log_ratio": between(log_ratio[0], log_ratio[1], column("log_ratio")),
        "offset": column("offset"),
        "flip": column("flip") < recipe.flip_p,
        "jitter": column("jitter") < recipe.jitter_p,
        "order": np.argsort(column("order"), axis=-1),  # a uniform random permutation, as torch.randperm(4)
        "factor": np.stack(factors, axis=-1),  # brightness, contrast, saturation, hue (torchvision's hue_factor)
        "gray": column("gray") < recipe.grayscale_p,
        "blur_sigma": np.where(blurred, between(recipe.blur_sigma[0], recipe.blur_sigma[1], column("sigma")), 0.0),
        "solarize": column("solarize") < np.array([solarize_p for _, _, _, solarize_p in slots]),
    }


def graph_input_names(recipe: MultiCropRecipe, return_params: bool) -> list[str]:
    """Names of the external-source outputs of `multicrop_pipeline`, in order (see `graph_inputs`)."""
    names = ["area", "log_ratio", "offset", "flip"] + (["blur_sigma"] if return_params else [])
    for group, _ in recipe.groups():
        names += [f"{group}.{field}{k}" for k in range(2 * _BLENDS_AROUND_HUE)
                  for field in ("blend_contrast", "blend_saturation", "blend_factor")]
        names += [f"{group}.{field}" for field in ("hue", "hue_shift", "gray", "solarize")]
        names += [f"{group}.blur_weight{k}" for k in range(blur_reach(recipe) + 1)]
    return names


def graph_inputs(recipe: MultiCropRecipe, draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The draws as the graph reads them: {name of `graph_input_names`: batch array}.

    ColorJitter becomes 3 blends, the hue step, 3 blends: the operations before hue in the drawn order fill the first
    blends, those after it the last ones, the rest are identity blends (factor 1). A blur pass is PIL's kernel: weight
    ww / 2**24 on the pixel and on the pixels at distance 1 .. r, fw / 2**24 at distance r + 1 (identity: weight 1
    on the pixel). Per-frame parameters have shape [B, frames, 1, 1, 1] so that they broadcast over [frames, H, W, C].
    """
    batch = len(draws["flip"])
    jitter = draws["jitter"]
    order = draws["order"]
    hue_position = np.argmax(order == HUE, axis=-1)
    blend_ops = order[order != HUE].reshape(batch, recipe.num_crops, _BLENDS_AROUND_HUE)
    factor = np.take_along_axis(draws["factor"], blend_ops, axis=-1)
    # torchvision's adjust_hue adds np.int32(hue_factor * 255) to PIL's uint8 hue, wrapping around
    hue_shift = np.trunc(draws["factor"][..., HUE] * 255.0).astype(np.int64) % 256
    before_hue = np.arange(_BLENDS_AROUND_HUE) < hue_position[..., None]
    blends = []  # (operation or -1 for identity, factor) of the 6 blend steps
    for applies in (before_hue, ~before_hue):
        on = applies & jitter[..., None]
        blends += [(np.where(on[..., k], blend_ops[..., k], -1), np.where(on[..., k], factor[..., k], 1.0))
                   for k in range(_BLENDS_AROUND_HUE)]
    r, ww, fw = pil_box_blur(draws["blur_sigma"])
    blurred = draws["blur_sigma"] > 0
    r, ww, fw = np.where(blurred, r, 0), np.where(blurred, ww, _FIXED_ONE), np.where(blurred, fw, 0)  # identity
    reach = blur_reach(recipe)
    if r.max(initial=0) >= reach:
        raise ValueError(f"blur sigma beyond the recipe's range {recipe.blur_sigma}")
    distance = np.arange(reach + 1)
    weight = np.where(distance <= r[..., None], ww[..., None], np.where(distance == r[..., None] + 1, fw[..., None], 0))

    def per_frame(values: np.ndarray, slots: range, dtype) -> np.ndarray:
        return values[:, slots.start:slots.stop].reshape(batch, len(slots), 1, 1, 1).astype(dtype)

    arrays = {"area": draws["area"], "log_ratio": draws["log_ratio"], "offset": draws["offset"],
              "flip": draws["flip"].astype(np.int32), "blur_sigma": draws["blur_sigma"].astype(np.float32)}
    for group, slots in recipe.groups():
        for k, (operation, blend_factor) in enumerate(blends):
            arrays[f"{group}.blend_contrast{k}"] = per_frame(operation == CONTRAST, slots, np.int32)
            arrays[f"{group}.blend_saturation{k}"] = per_frame(operation == SATURATION, slots, np.int32)
            arrays[f"{group}.blend_factor{k}"] = per_frame(blend_factor, slots, np.float32)  # PIL's C float
        for k in range(reach + 1):
            arrays[f"{group}.blur_weight{k}"] = per_frame(weight[..., k] / _FIXED_ONE, slots, np.float64)  # exact
        arrays.update({f"{group}.hue": per_frame(jitter & (recipe.hue > 0), slots, np.int32),
                       f"{group}.hue_shift": per_frame(hue_shift, slots, np.int32),
                       f"{group}.gray": per_frame(draws["gray"], slots, np.int32),
                       f"{group}.solarize": per_frame(draws["solarize"], slots, np.int32)})
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}  # DALI takes dense arrays only


# ---------------------------------------------------------------------------------------------------------------
# The graph.

def _pil_hue_rounded_down() -> tuple[int, ...]:
    """Per exact hue quotient k = 255 H / (6 chroma) (0..255): 1 where PIL's float arithmetic returns k - 1, else 0.

    Read off PIL itself, at the colours of chroma 85 (max 85, min 0) where H = 2k. Which k is a property of PIL's
    float path; that it depends on k only is checked on all 2**24 colours by tests/test_dali_fidelity.py.
    """
    numerator = 2 * np.arange(255)  # k = 255 would need H = 6 chroma, outside [0, 6 chroma)
    sextant, rising = np.divmod(numerator, 85)
    falling, zero, full = 85 - rising, np.zeros_like(rising), np.full_like(rising, 85)
    red = np.choose(sextant, [full, falling, zero, zero, rising, full])
    green = np.choose(sextant, [rising, full, full, falling, zero, zero])
    blue = np.choose(sextant, [zero, zero, rising, full, full, falling])
    colours = np.stack([red, green, blue], axis=-1).astype(np.uint8)[None]
    pil_hue = np.asarray(Image.fromarray(colours).convert("HSV"))[0, :, 0].astype(np.int64)
    return tuple(int(k - hue) for k, hue in enumerate(pil_hue)) + (0,)


_PIL_HUE_ROUNDED_DOWN = _pil_hue_rounded_down()
# hsv2rgb: which of (v, p, q, t) becomes red, green, blue in each hue sector (6 = hue 255, as sector 0),
# as the byte (power of 256) holding it in the packed value v + 256 p + 256**2 q + 256**3 t.
_SECTOR_BYTE = ((0, 2, 1, 1, 3, 0, 0), (3, 0, 0, 2, 1, 1, 3), (1, 1, 3, 0, 0, 2, 1))


def _on(device: str, node: DataNode) -> DataNode:
    """A host-side parameter as an operand of arithmetic with data on `device` (GPU arithmetic needs GPU operands)."""
    return node.gpu() if device == "gpu" else node


def _lookup(index: DataNode, table: Sequence[int], dtype) -> DataNode:
    """table[index] elementwise (integer index in 0 .. len(table) - 1)."""
    return fn.lookup_table(index, keys=list(range(len(table))), values=[float(v) for v in table], dtype=dtype)


def _select(flag: DataNode, chosen: DataNode, other: DataNode) -> DataNode:
    """uint8 `chosen` in the frames whose flag is 1, `other` elsewhere (in int32, so that nothing wraps)."""
    return fn.cast(flag * chosen + (1 - flag) * other, dtype=types.UINT8)


def _crop_windows(shape: DataNode, area: DataNode, log_ratio: DataNode, offset: DataNode,
                  aspect_ratio: tuple[float, float]) -> tuple[DataNode, DataNode]:
    """RandomResizedCrop.get_params for all crop slots at once: anchors (y, x) and windows (h, w), float64 [crops, 2].

    Attempt k has `area[:, k]` of the image and aspect ratio exp(log_ratio[:, k]); w and h are rounded half up
    (torchvision rounds half to even: a difference of probability zero). The first attempt that fits is placed at
    offset floor(u * (free + 1)), u ~ U[0, 1) (torch.randint's distribution); when none fits, the whole image is cut
    to the nearest allowed aspect ratio and centred.
    """
    height, width = (fn.cast(shape[axis], dtype=types.FLOAT64) for axis in (0, 1))
    target = area * (height * width)
    ratio = dmath.exp(log_ratio)
    w = dmath.floor(dmath.sqrt(target * ratio) + 0.5)
    h = dmath.floor(dmath.sqrt(target / ratio) + 0.5)
    fits = (w >= 1.0) & (w <= width) & (h >= 1.0) & (h <= height)
    priority = fits * types.Constant(np.arange(CROP_ATTEMPTS, 0, -1, dtype=np.int32))
    first = (priority == fn.reductions.max(priority, axes=[1], keep_dims=True)) & fits  # one-hot, or all false
    found = fn.cast(fn.reductions.max(priority, axes=[1]) > 0, dtype=types.FLOAT64)
    fallback_w = dmath.min(width, dmath.floor(height * max(aspect_ratio) + 0.5))
    fallback_h = dmath.min(height, dmath.floor(width / min(aspect_ratio) + 0.5))
    h, w = (fn.reductions.sum(fn.cast(first * size, dtype=types.INT32), axes=[1]) for size in (h, w))  # no f64 sum
    h = found * h + (1.0 - found) * fallback_h
    w = found * w + (1.0 - found) * fallback_w
    y = found * dmath.floor(offset[:, 0] * (height - h + 1.0)) + (1.0 - found) * dmath.floor((height - h) / 2.0)
    x = found * dmath.floor(offset[:, 1] * (width - w + 1.0)) + (1.0 - found) * dmath.floor((width - w) / 2.0)
    return fn.stack(y, x, axis=1), fn.stack(h, w, axis=1)


def _pil_luma(frames: DataNode) -> DataNode:
    """PIL's convert("L") of uint8 RGB, int32 [..., 1]; exact, as the weighted sum stays below 2**24 (float32)."""
    weighted = fn.coord_transform(frames, M=[float(w) for w in PIL_LUMA_WEIGHTS], T=[float(1 << 15)],
                                  dtype=types.FLOAT)
    return fn.cast(weighted, dtype=types.INT32) // (1 << 16)


def _pil_blend(frames: DataNode, contrast: DataNode, saturation: DataNode, factor: DataNode, size: int,
               device: str) -> DataNode:
    """ImageEnhance's Image.blend(degenerate, frames, factor) per frame, as PIL's C code: in float32,
    (int) D + factor * (x - D), clipped to 0..255 and truncated. D is 0 (brightness), the luma mean rounded as
    int(ImageStat mean + 0.5) (contrast, contrast = 1) or the luma (saturation, saturation = 1); factor 1 is the
    identity."""
    luma = _pil_luma(frames)
    total = fn.reductions.sum(luma, axes=[1, 2, 3], keep_dims=True, dtype=types.INT64)
    mean = fn.cast((2 * total + size * size) // (2 * size * size), dtype=types.INT32)
    degenerate = _on(device, contrast) * mean + _on(device, saturation) * luma
    blended = degenerate + _on(device, factor) * (frames - degenerate)
    return fn.cast(dmath.floor(blended), dtype=types.UINT8)  # DALI's cast saturates: PIL's clipping to 0..255


def _pil_hue(frames: DataNode, shift: DataNode, device: str) -> DataNode:
    """torchvision's adjust_hue of a PIL image: RGB -> PIL's uint8 HSV, hue + shift mod 256, -> RGB.

    Integer arithmetic equal to PIL's float code (Convert.c rgb2hsv_row, hsv2rgb) on every colour: hue =
    floor(255 H / (6 chroma)) with H the position in [0, 6 chroma) along the hue hexagon, one less where that
    quotient is an exact integer PIL's floats round down (_PIL_HUE_ROUNDED_DOWN); saturation = floor(255 chroma /
    max); back to RGB, p, q, t are PIL's products rounded half up, computed exactly.
    """
    rgb = fn.cast(frames, dtype=types.INT32)
    r, g, b = rgb[:, :, :, 0:1], rgb[:, :, :, 1:2], rgb[:, :, :, 2:3]
    value = dmath.max(r, dmath.max(g, b))
    chroma = value - dmath.min(r, dmath.min(g, b))
    from_red = g - b + 6 * chroma * (g < b)
    from_green = 2 * chroma + b - r
    from_blue = 4 * chroma + r - g
    position = from_blue + (g == value) * (from_green - from_blue)
    position = position + (r == value) * (from_red - position)  # red wins ties, then green, as in PIL
    numerator = 255 * position
    denominator = 6 * dmath.max(chroma, 1)
    hue = numerator // denominator
    hue = hue - (numerator == hue * denominator) * _lookup(hue, _PIL_HUE_ROUNDED_DOWN, types.INT32)
    saturation = 255 * chroma // dmath.max(value, 1)
    hue = (hue + _on(device, shift)) & 255  # torchvision adds np.uint8(shift): wraps around
    sixths = 6 * hue
    sector = sixths // 255
    fraction = sixths - 255 * sector  # 255 * PIL's f
    p = (2 * value * (255 - saturation) + 255) // 510
    q = (2 * value * (255 * 255 - saturation * fraction) + 255 * 255) // (2 * 255 * 255)
    t = (2 * value * (255 * 255 - saturation * (255 - fraction)) + 255 * 255) // (2 * 255 * 255)
    packed = value + 256 * p + 256 * 256 * q + types.Constant(256 ** 3, dtype=types.INT64) * t
    channels = [(packed // _lookup(sector, [256 ** byte for byte in bytes_], types.INT64)) & 255
                for bytes_ in _SECTOR_BYTE]
    return fn.cast(fn.cat(*channels, axis=3), dtype=types.UINT8)


def _pil_gaussian_blur(frames: DataNode, weights: list[DataNode], count: int, size: int, device: str) -> DataNode:
    """PIL's GaussianBlur of `count` uint8 frames [size, size, 3]: BOX_PASSES extended box passes along x, then along
    y on the transposed frames (as PIL does), each rounded to uint8 as PIL does.

    A pass is out[x] = floor(sum_k weight_k * ring_k[x] + 1/2) with ring_0 the pixel and ring_k = in[x-k] + in[x+k]
    (edges clamped): PIL's fixed-point sum, bit for bit, since rings are exact in float32 and the weights (multiples
    of 2**-24) make exact float64 products. Rings are fixed [1, 0 .. 0, 1] filters along the rows of all frames at
    once; the per-frame radius is in the weights.
    """
    weights = [_on(device, weight) for weight in weights]
    rings = [types.Constant(np.eye(1, 2 * k + 1, 0, dtype=np.float32) + np.eye(1, 2 * k + 1, 2 * k, dtype=np.float32))
             for k in range(1, len(weights))]
    for _ in ("x", "y"):
        for _ in range(BOX_PASSES):
            rows = fn.reshape(frames, shape=[count * size, size, 3], layout="HWC")  # one tall image
            total = weights[0] * frames
            for weight, ring in zip(weights[1:], rings):
                summed = fn.filter(rows, ring, border="clamp", dtype=types.FLOAT)
                total = total + weight * fn.reshape(summed, shape=[count, size, size, 3], layout="FHWC")
            frames = fn.cast(dmath.floor(total + 0.5), dtype=types.UINT8)
        frames = fn.transpose(frames, perm=[0, 2, 1, 3], output_layout="FHWC")
    return frames


def _solarize(frames: DataNode) -> DataNode:
    """Invert pixels >= SOLARIZE_THRESHOLD: an exact 256-entry lookup table on uint8."""
    return _lookup(frames, [v if v < SOLARIZE_THRESHOLD else 255 - v for v in range(256)], types.UINT8)


def _augment_frames(frames: DataNode, params: dict[str, DataNode], recipe: MultiCropRecipe, count: int, size: int,
                    device: str) -> DataNode:
    """Colour jitter, grayscale, blur and solarize of `count` uint8 frames [size, size, 3] (FHWC), each with its own
    parameters."""
    def on(name: str) -> DataNode:
        return _on(device, params[name])

    for k in range(2 * _BLENDS_AROUND_HUE):
        if k == _BLENDS_AROUND_HUE:
            frames = _select(on("hue"), _pil_hue(frames, params["hue_shift"], device), frames)
        frames = _pil_blend(frames, params[f"blend_contrast{k}"], params[f"blend_saturation{k}"],
                            params[f"blend_factor{k}"], size, device)
    frames = _select(on("gray"), _pil_luma(frames), frames)
    weights = [params[f"blur_weight{k}"] for k in range(blur_reach(recipe) + 1)]
    frames = _pil_gaussian_blur(frames, weights, count, size, device)
    return _select(on("solarize"), _solarize(frames), frames)


@pipeline_def
def multicrop_pipeline(reader: dict, recipe: MultiCropRecipe, decode_device: str, crop_dtype,
                       draw_source: Callable[[int], dict[str, np.ndarray]], return_params: bool = False):
    """Outputs: labels, then per crop slot the crop [3, S, S] (crop_dtype) -- and, when return_params,
    the crop anchor [2] (y, x), window [2] (h, w), flip (0/1) and blur sigma (0 if none) of that slot.

    `reader`: {"kind": "file", "files": [...], "labels": [...]} or {"kind": "webdataset", **webdataset kwargs}.
    decode_device: "cpu" or "mixed" (nvJPEG, hardware decoder where present); with "mixed", crops stay on the GPU.
    draw_source(iteration): `graph_inputs` of the samples the reader yields at that iteration.
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
    names = graph_input_names(recipe, return_params)

    def source(iteration: int) -> list[np.ndarray]:
        arrays = draw_source(iteration)
        return [arrays[name] for name in names]

    inputs = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True)))
    anchors, windows = _crop_windows(fn.peek_image_shape(encoded), inputs["area"], inputs["log_ratio"],
                                     inputs["offset"], recipe.aspect_ratio)
    crops = []
    for group, slots in recipe.groups():
        size = recipe.slot(slots.start)[0]
        resized = []
        for slot in slots:
            start = fn.cast(anchors[slot], dtype=types.FLOAT)
            resized.append(fn.resize(image, size=[size, size], roi_start=start,
                                     roi_end=start + fn.cast(windows[slot], dtype=types.FLOAT),
                                     interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8))
        params = {name.split(".", 1)[1]: node for name, node in inputs.items() if name.startswith(f"{group}.")}
        frames = _augment_frames(fn.stack(*resized, axis=0, axis_name="F"), params, recipe, len(slots), size, device)
        crops += [frames[k] for k in range(len(slots))]
    outputs = [labels]
    for slot, crop in enumerate(crops):
        flip = inputs["flip"][slot]
        out = fn.crop_mirror_normalize(crop, mirror=flip, dtype=crop_dtype, output_layout="CHW",
                                       mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std])
        outputs.append(out)
        if return_params:
            outputs += [fn.cast(anchors[slot], dtype=types.INT64), fn.cast(windows[slot], dtype=types.INT64), flip,
                        inputs["blur_sigma"][slot]]
    return tuple(outputs)
