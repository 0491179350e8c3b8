"""The host side of the DALI multi-crop graph: every random number of a sample, and the per-frame parameters the graph
(`dali_pipeline`) reads, computed from a `recipe.MultiCropRecipe`.

The graph draws nothing: each sample's uniforms come from a torch.Generator seeded with that sample's seed, so its
crops depend on its seed only, not on its batch position, and a mid-epoch resume replays them exactly. The uniforms
of a crop slot are laid out in a fixed order (`_UNIFORMS`), so a recipe's probabilities and ranges change the values
drawn, never which uniform feeds what.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fastdino.data.recipe import CONTRAST, CROP_ATTEMPTS, HUE, SATURATION, MultiCropRecipe

BOX_PASSES = 3  # PIL's GaussianBlur: three extended box passes per axis
_FIXED_ONE = 1 << 24  # PIL's box blur weights are fixed-point with 24 fractional bits
# The blends applied before and after the hue step (torchvision's random order puts hue anywhere among the four).
BLENDS_AROUND_HUE = 3
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

    slots = recipe.slots()
    scale_low, scale_high = (np.array([slot.scale[k] for slot in slots])[:, None] for k in (0, 1))
    log_ratio = np.log(np.array(recipe.aspect_ratio))
    factors = [between(max(0.0, 1.0 - strength), 1.0 + strength, column("factor")[..., k])
               for k, strength in enumerate((recipe.brightness, recipe.contrast, recipe.saturation))]
    factors.append(between(-recipe.hue, recipe.hue, column("factor")[..., HUE]))
    blurred = column("blur") < np.array([slot.blur_p for slot in slots])
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
        "solarize": column("solarize") < np.array([slot.solarize_p for slot in slots]),
    }


def graph_input_names(recipe: MultiCropRecipe, return_params: bool) -> list[str]:
    """Names of the external-source outputs of `multicrop_pipeline`, in order (see `graph_inputs`)."""
    names = ["area", "log_ratio", "offset", "flip"] + (["blur_sigma"] if return_params else [])
    for group, _ in recipe.groups():
        names += [f"{group}.{field}{k}" for k in range(2 * BLENDS_AROUND_HUE)
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
    blend_ops = order[order != HUE].reshape(batch, recipe.num_crops, BLENDS_AROUND_HUE)
    factor = np.take_along_axis(draws["factor"], blend_ops, axis=-1)
    # torchvision's adjust_hue adds np.int32(hue_factor * 255) to PIL's uint8 hue, wrapping around
    hue_shift = np.trunc(draws["factor"][..., HUE] * 255.0).astype(np.int64) % 256
    before_hue = np.arange(BLENDS_AROUND_HUE) < hue_position[..., None]
    blends = []  # (operation or -1 for identity, factor) of the 6 blend steps
    for applies in (before_hue, ~before_hue):
        on = applies & jitter[..., None]
        blends += [(np.where(on[..., k], blend_ops[..., k], -1), np.where(on[..., k], factor[..., k], 1.0))
                   for k in range(BLENDS_AROUND_HUE)]
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

