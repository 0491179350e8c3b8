"""The DALI graph of the DINO multi-crop augmentation (one image in, the recipe's crops out), computing what the
torchvision reference (`augment.DataAugmentationDINO`, PIL images) computes, in PIL's own arithmetic.

What each crop slot gets comes from a `recipe.MultiCropRecipe`. Randomness: the graph draws nothing. Every random
number of a sample is drawn on the host (`dali_draws.draw_augmentations`) from a generator seeded with that sample's
seed (the loader passes `torch_loader.sample_seed(seed, epoch, index)`, the torchvision loader's rule) and enters the
graph through `fn.external_source` (`dali_draws.graph_inputs`).

Per crop slot: crop window (RandomResizedCrop.get_params: CROP_ATTEMPTS attempts drawn on the host, tested against
the image shape in the graph, central fallback) -> bicubic antialiased resize (uint8). The crops of one size (the
globals; the locals) are then stacked as frames of one FHWC sequence and every step runs on all of them with
per-frame parameters, a step that does not apply to a frame being given identity parameters (so the graph has no
conditionals): ColorJitter as ImageEnhance and torchvision's PIL adjust_hue do it, in torchvision's random order ->
grayscale (PIL's integer luma) -> PIL's GaussianBlur (three extended box passes per axis with its fixed-point
rounding) -> solarize -> per slot: flip + normalization + HWC->CHW + cast in crop_mirror_normalize.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from nvidia.dali import fn, math as dmath, pipeline_def, types
from nvidia.dali.data_node import DataNode
from PIL import Image

from fastdino.data.dali_draws import BLENDS_AROUND_HUE, BOX_PASSES, blur_reach, graph_input_names
from fastdino.data.recipe import CROP_ATTEMPTS, MultiCropRecipe

# PIL's convert("L") (Convert.c, L24): L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
PIL_LUMA_WEIGHTS = (19595, 38470, 7471)

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


def _solarize(frames: DataNode, threshold: int = MultiCropRecipe.solarize_threshold) -> DataNode:
    """Invert pixels >= threshold (PIL's ImageOps.solarize): an exact 256-entry lookup table on uint8."""
    return _lookup(frames, [v if v < threshold else 255 - v for v in range(256)], types.UINT8)


def _augment_frames(frames: DataNode, params: dict[str, DataNode], recipe: MultiCropRecipe, count: int, size: int,
                    device: str) -> DataNode:
    """Colour jitter, grayscale, blur and solarize of `count` uint8 frames [size, size, 3] (FHWC), each with its own
    parameters."""
    def on(name: str) -> DataNode:
        return _on(device, params[name])

    for k in range(2 * BLENDS_AROUND_HUE):
        if k == BLENDS_AROUND_HUE:
            frames = _select(on("hue"), _pil_hue(frames, params["hue_shift"], device), frames)
        frames = _pil_blend(frames, params[f"blend_contrast{k}"], params[f"blend_saturation{k}"],
                            params[f"blend_factor{k}"], size, device)
    frames = _select(on("gray"), _pil_luma(frames), frames)
    weights = [params[f"blur_weight{k}"] for k in range(blur_reach(recipe) + 1)]
    frames = _pil_gaussian_blur(frames, weights, count, size, device)
    return _select(on("solarize"), _solarize(frames, recipe.solarize_threshold), frames)


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
        size = recipe.slots()[slots.start].size
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
